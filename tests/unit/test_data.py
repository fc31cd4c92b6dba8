from __future__ import annotations

import torch

from peer.config import DataConfig
from peer.data import (
    TokenCorpus,
    Tokenizer,
    data_seed,
    eval_batches,
    load_corpus,
    open_corpus,
    shard_slice,
    train_batches,
)


def test_shards_are_disjoint_and_cover_everything():
    slices = [shard_slice(1003, (i, 4)) for i in range(4)]
    assert slices[0][0] == 0 and slices[-1][1] == 1003
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))


def test_batches_are_deterministic_per_seed_and_stay_in_the_shard():
    tokens = torch.arange(10_000, dtype=torch.int32)
    first = train_batches(tokens, batch_size=4, seq_len=16, seed=5, shard=(2, 4))
    again = train_batches(tokens, batch_size=4, seq_len=16, seed=5, shard=(2, 4))
    other = train_batches(tokens, batch_size=4, seq_len=16, seed=6, shard=(2, 4))
    a, b, c = next(first), next(again), next(other)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 5000 and int(a.max()) < 7500


def test_data_seed_depends_on_stream():
    assert data_seed(0, "0/2") == data_seed(0, "0/2") != data_seed(0, "1/2")


def test_embedded_corpus_loads_offline_with_a_held_out_tail():
    tokenizer = Tokenizer("embedded")
    corpus = load_corpus(DataConfig(eval_tokens=4096), tokenizer)
    assert len(corpus.eval) == 4096 and len(corpus.train) > 1_000_000
    assert int(corpus.train.max()) < tokenizer.vocab_size
    batches = eval_batches(corpus.eval, batch_size=4, seq_len=64, num_batches=3)
    assert len(batches) == 3 and batches[0].shape == (4, 64)


def test_the_embedded_stream_is_train_batches_and_resumes_from_its_batch_count():
    tokens = torch.arange(10_000, dtype=torch.int32)
    corpus = TokenCorpus(train=tokens, eval=tokens[:100])
    reference = train_batches(tokens, batch_size=4, seq_len=16, seed=5, shard=(1, 2))
    stream = corpus.train_stream(seed=5, batch_size=4, seq_len=16, shard=(1, 2))
    expected = [next(reference) for _ in range(7)]
    assert all(torch.equal(next(stream), want) for want in expected[:3])
    saved = stream.state_dict()
    assert saved == {"kind": "windows", "batches_drawn": 3}
    resumed = corpus.train_stream(seed=5, batch_size=4, seq_len=16, shard=(1, 2))
    resumed.load_state_dict(saved)
    assert all(torch.equal(next(resumed), want) for want in expected[3:])
    # a checkpoint written before positions were dicts holds only the count
    old = corpus.train_stream(seed=5, batch_size=4, seq_len=16, shard=(1, 2))
    old.load_state_dict({"batches_drawn": 6})
    assert torch.equal(next(old), expected[6])


def test_open_corpus_embedded_is_the_in_memory_corpus():
    config = DataConfig(eval_tokens=4096)
    tokenizer = Tokenizer("embedded")
    opened, loaded = open_corpus(config, tokenizer), load_corpus(config, tokenizer)
    assert torch.equal(opened.train, loaded.train) and torch.equal(opened.eval, loaded.eval)
    held_out = opened.eval_batches(batch_size=4, seq_len=64, num_batches=3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            held_out, eval_batches(loaded.eval, batch_size=4, seq_len=64, num_batches=3), strict=True
        )
    )
