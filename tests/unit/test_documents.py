"""Real data offline: local parquet files and save_to_disk datasets, tokenized and packed with an exact position."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from peer.data import Tokenizer, read_embedded_documents
from peer.data_source import DocumentSource
from peer.documents import open_documents

SEQ, BATCH = 32, 4


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("embedded")


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """120 real documents: paragraphs of the first work of the embedded corpus."""
    work = read_embedded_documents()[0]["text"]
    return [p.strip() for p in work.split("\n\n") if len(p.strip()) > 200][:120]


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory, paragraphs) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("parquet")
    paths = []
    for part in range(3):
        docs = paragraphs[part::3]
        table = pa.table({"content": docs, "id": list(range(len(docs))), "empty": [""] * len(docs)})
        paths.append(str(folder / f"part-{part}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory, paragraphs) -> str:
    import datasets

    folder = tmp_path_factory.mktemp("saved") / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": paragraphs[:100]}),
            "validation": datasets.Dataset.from_dict({"text": paragraphs[100:]}),
        }
    ).save_to_disk(str(folder))
    return str(folder)


def take(stream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


def test_a_parquet_file_gives_batches_and_every_peer_the_same_held_out_slice(parquet_files, tokenizer):
    source = DocumentSource(dataset=parquet_files[0], text_field="content")
    corpus = open_documents(source, tokenizer, eval_tokens=500)
    assert len(corpus.eval) == 500 and 0 < corpus.train_end < 40
    held_out = corpus.eval_batches(batch_size=BATCH, seq_len=SEQ, num_batches=2)
    assert len(held_out) == 2 and held_out[0].shape == (BATCH, SEQ)

    peer_a = corpus.train_stream(seed=1, batch_size=BATCH, seq_len=SEQ)
    peer_b = corpus.train_stream(seed=2, batch_size=BATCH, seq_len=SEQ)
    a, b = take(peer_a, 3), take(peer_b, 3)
    assert all(x.shape == (BATCH, SEQ) and x.dtype == torch.long for x in a)
    assert int(torch.stack(a).min()) >= 0 and int(torch.stack(a).max()) < tokenizer.vocab_size
    assert not torch.equal(a[0], b[0])  # different peers, different order
    again = corpus.train_stream(seed=1, batch_size=BATCH, seq_len=SEQ)
    assert all(torch.equal(x, y) for x, y in zip(a, take(again, 3), strict=True))
    # the held-out documents are not trained on: no training window repeats a held-out window
    eval_rows = {tuple(row.tolist()) for batch in held_out for row in batch}
    trained = {tuple(row.tolist()) for batch in take(peer_a, 40) for row in batch}
    assert not eval_rows & trained


def test_a_save_to_disk_dataset_trains_on_train_and_evaluates_on_validation(
    saved_dataset, paragraphs, tokenizer
):
    source = DocumentSource(dataset=saved_dataset, eval_split="validation")
    corpus = open_documents(source, tokenizer, eval_tokens=300)
    assert corpus.train_end == 100  # the whole training split: the held-out slice comes from validation
    first_validation = tokenizer.encode([paragraphs[100]])[0]
    assert corpus.eval[:20].tolist() == first_validation[:20]
    batch = next(corpus.train_stream(seed=3, batch_size=BATCH, seq_len=SEQ))
    assert batch.shape == (BATCH, SEQ)
    with pytest.raises(ValueError, match="has no split 'test'; its splits are: train, validation"):
        open_documents(DocumentSource(dataset=saved_dataset, split="test"), tokenizer, eval_tokens=0)


@pytest.mark.parametrize("streaming", [False, True])
def test_an_unknown_text_field_is_a_clear_error_naming_the_columns(parquet_files, tokenizer, streaming):
    source = DocumentSource(dataset=parquet_files[0], text_field="body", streaming=streaming)
    with pytest.raises(ValueError, match=r"--text-field 'body' is not a column .*: content, id, empty$"):
        open_documents(source, tokenizer, eval_tokens=0)
    with pytest.raises(ValueError, match=r"--text-field 'id' .* holds int64, not text"):
        open_documents(DocumentSource(dataset=parquet_files[0], text_field="id"), tokenizer, eval_tokens=0)


def test_missing_local_data_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no such file or directory"):
        open_documents(DocumentSource(dataset=str(tmp_path / "nope.parquet")), tokenizer, eval_tokens=0)


def test_a_restored_stream_continues_exactly_where_it_stopped_across_epochs(saved_dataset, tokenizer):
    corpus = open_documents(DocumentSource(dataset=saved_dataset), tokenizer, eval_tokens=200)
    corpus = dataclasses.replace(corpus, train_end=24)  # short epochs
    tokens_per_epoch = sum(
        len(ids) + 1 for ids in tokenizer.encode(corpus.dataset[: corpus.train_end]["text"])
    )
    num_batches = 2 * tokens_per_epoch // (BATCH * SEQ) + 3  # into the third epoch
    straight = take(corpus.train_stream(seed=9, batch_size=BATCH, seq_len=SEQ), num_batches)

    first = corpus.train_stream(seed=9, batch_size=BATCH, seq_len=SEQ)
    resumed_at = []
    for stop in (1, num_batches // 2, num_batches - 2):  # save and restore three times, through a JSON file
        take(first, stop - first.batches_drawn)
        saved = json.loads(json.dumps(first.state_dict()))
        first = corpus.train_stream(seed=9, batch_size=BATCH, seq_len=SEQ)
        first.load_state_dict(saved)
        resumed_at.append(saved["position"]["epoch"])
        assert torch.equal(next(first), straight[stop])
    assert resumed_at[-1] == 2  # the last restore happened in the third epoch
    assert first.batches_drawn == num_batches - 1


def test_a_streamed_dataset_resumes_exactly_and_never_trains_on_its_held_out_documents(
    parquet_files, tokenizer
):
    source = DocumentSource(
        dataset=parquet_files[0].replace("part-0", "part-*"), text_field="content", streaming=True
    )
    corpus = open_documents(source, tokenizer, eval_tokens=400)
    assert corpus.dataset.num_shards == 3 and len(corpus.excluded) >= 2
    straight = take(corpus.train_stream(seed=5, batch_size=BATCH, seq_len=SEQ), 120)  # past one epoch
    stream = corpus.train_stream(seed=5, batch_size=BATCH, seq_len=SEQ)
    take(stream, 57)
    saved = json.loads(json.dumps(stream.state_dict()))
    assert saved["position"]["state"] is not None  # in the middle of a shard
    resumed = corpus.train_stream(seed=5, batch_size=BATCH, seq_len=SEQ)
    resumed.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 63), straight[57:], strict=True))
    # peers start in different shards
    firsts = {
        tuple(next(corpus.train_stream(seed=s, batch_size=1, seq_len=SEQ))[0].tolist()) for s in range(6)
    }
    assert len(firsts) > 1


def test_data_shards_are_disjoint_and_a_position_only_fits_its_own_layout(saved_dataset, tokenizer):
    corpus = open_documents(DocumentSource(dataset=saved_dataset), tokenizer, eval_tokens=0)
    halves = [corpus.train_stream(seed=0, batch_size=BATCH, seq_len=SEQ, shard=(i, 2)) for i in range(2)]
    rows = [{tuple(r.tolist()) for b in take(s, 10) for r in b} for s in halves]
    assert not rows[0] & rows[1]
    with pytest.raises(ValueError, match="another dataset or data layout"):
        halves[0].load_state_dict(corpus.train_stream(seed=0, batch_size=BATCH, seq_len=SEQ).state_dict())


def test_a_local_dataset_also_fits_in_memory_for_the_simulation(saved_dataset, parquet_files, tokenizer):
    from peer.config import DataConfig
    from peer.data import load_corpus, open_corpus

    config = DataConfig(dataset=saved_dataset, eval_tokens=300, seq_len=SEQ)
    in_memory, streamed = load_corpus(config, tokenizer), open_corpus(config, tokenizer)
    assert torch.equal(in_memory.eval, streamed.eval)  # the same held-out slice either way
    texts = streamed.dataset[: streamed.train_end]["text"]
    assert in_memory.train.tolist() == [
        t for ids in tokenizer.encode(texts) for t in [*ids, tokenizer.eos_id]
    ]
    glob = parquet_files[0].replace("part-0", "part-*")
    with pytest.raises(ValueError, match="streamed and does not fit in memory"):
        from peer.documents import tokens_in_memory

        tokens_in_memory(
            DocumentSource(dataset=glob, text_field="content", streaming=True), tokenizer, eval_tokens=0
        )
