"""Real data: the documents of an opened dataset (see data_source.py), tokenized and packed into (batch, seq_len)
blocks on the fly, in a per-peer order, with an exact position to resume from; and the shared held-out slice."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peer.data_source import DocumentSource, check_text_field, is_indexed, load_split

if TYPE_CHECKING:
    from peer.data import Tokenizer

logger = logging.getLogger(__name__)

# A local (indexed) dataset is read in chunks of consecutive documents: each peer visits the chunks in its own
# random order and the documents of a chunk in a random order. At least MIN_CHUNKS chunks, so that peers start
# in different places of even a small dataset; at most MAX_CHUNK_DOCS documents each, so that one chunk is cheap.
MIN_CHUNKS, MAX_CHUNK_DOCS = 64, 1024
# Documents tokenized per call (the fast tokenizers batch in Rust); bounds memory with very long documents.
TOKENIZE_BATCH_DOCS = 32


def _text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8", errors="replace")).digest()[:12]


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document followed by the end-of-text token."""
    return [ids + [tokenizer.eos_id] for ids in tokenizer.encode(texts)]


class IndexedDocuments:
    """Documents [start, end) of a memory-mapped dataset, in a per-seed, per-epoch order: chunks of consecutive
    documents in a random order, the documents of a chunk in a random order. A position is
    {"epoch", "chunk", "doc"}: the doc-th document of the chunk-th chunk of that epoch's order."""

    def __init__(self, dataset, *, text_field: str, tokenizer: Tokenizer, start: int, end: int, seed: int):
        if end <= start:
            raise ValueError("no training documents left (the dataset is too small for its held-out slice)")
        self.dataset, self.text_field, self.tokenizer, self.seed = dataset, text_field, tokenizer, seed
        self.start, self.end = start, end
        self.chunk_docs = max(1, min(MAX_CHUNK_DOCS, (end - start) // MIN_CHUNKS))
        self.num_chunks = math.ceil((end - start) / self.chunk_docs)

    def first_position(self) -> dict:
        return {"epoch": 0, "chunk": 0, "doc": 0}

    def layout(self) -> dict:
        """What a saved position is only valid for."""
        return {"start": self.start, "end": self.end, "chunk_docs": self.chunk_docs}

    def _chunk_documents(self, epoch: int, chunk_rank: int) -> np.ndarray:
        chunk = int(np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)[chunk_rank])
        low = self.start + chunk * self.chunk_docs
        high = min(self.end, low + self.chunk_docs)
        return low + np.random.default_rng([self.seed, epoch, chunk]).permutation(high - low)

    def documents(self, position: dict) -> Iterator[tuple[dict, list[int]]]:
        """(position, tokens) of every non-empty document from `position` on, endlessly (epoch after epoch)."""
        epoch, chunk_rank, doc = position["epoch"], position["chunk"], position["doc"]
        while True:
            found = False
            while chunk_rank < self.num_chunks:
                indices = self._chunk_documents(epoch, chunk_rank)
                for first in range(doc, len(indices), TOKENIZE_BATCH_DOCS):
                    picked = indices[first : first + TOKENIZE_BATCH_DOCS]
                    texts = self.dataset[[int(i) for i in picked]][self.text_field]
                    kept = [(first + j, text) for j, text in enumerate(texts) if text]
                    for (j, _), tokens in zip(
                        kept, _encode(self.tokenizer, [t for _, t in kept]), strict=True
                    ):
                        found = True
                        yield {"epoch": epoch, "chunk": chunk_rank, "doc": j}, tokens
                chunk_rank, doc = chunk_rank + 1, 0
            if not found and position["chunk"] == 0 and position["doc"] == 0:
                raise ValueError("every training document is empty")
            epoch, chunk_rank = epoch + 1, 0
            position = {"epoch": epoch, "chunk": 0, "doc": 0}
            logger.info(f"data: starting epoch {epoch} over {self.end - self.start} documents")


class StreamedDocuments:
    """Documents of a streamed dataset, shard (file) after shard in a per-seed, per-epoch shard order; inside a
    shard in the dataset's order. A position is {"epoch", "shard", "state"}: the shard-th shard of that epoch's
    order, resumed from the datasets state_dict taken just before the document."""

    def __init__(
        self,
        dataset,
        *,
        text_field: str,
        tokenizer: Tokenizer,
        seed: int,
        shard: tuple[int, int] | None,
        excluded: frozenset[bytes],
    ):
        self.dataset, self.text_field, self.tokenizer, self.seed = dataset, text_field, tokenizer, seed
        self.excluded = excluded
        self.num_shards = dataset.num_shards
        self.shards = list(range(self.num_shards))
        if shard is not None:
            index, count = shard
            if self.num_shards < count:
                raise ValueError(
                    f"--data-shard {index}/{count}: the streamed dataset has only {self.num_shards} shards (files)"
                )
            self.shards = self.shards[index::count]

    def first_position(self) -> dict:
        return {"epoch": 0, "shard": 0, "state": None}

    def layout(self) -> dict:
        return {"num_shards": self.num_shards, "shards": len(self.shards)}

    def _shard(self, epoch: int, shard_rank: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return self.dataset.shard(num_shards=self.num_shards, index=self.shards[int(order[shard_rank])])

    def documents(self, position: dict) -> Iterator[tuple[dict, list[int]]]:
        epoch, shard_rank, state = position["epoch"], position["shard"], position["state"]
        while True:
            found = False
            while shard_rank < len(self.shards):
                part = self._shard(epoch, shard_rank)
                if state is not None:
                    part.load_state_dict(state)
                examples = iter(part)
                try:
                    while True:
                        pending: list[tuple[dict, str]] = []
                        for _ in range(TOKENIZE_BATCH_DOCS):
                            before = part.state_dict()
                            example = next(examples, None)
                            if example is None:
                                break
                            text = example[self.text_field]
                            if text and _text_key(text) not in self.excluded:
                                pending.append(({"epoch": epoch, "shard": shard_rank, "state": before}, text))
                        for (where, _), tokens in zip(
                            pending, _encode(self.tokenizer, [t for _, t in pending]), strict=True
                        ):
                            found = True
                            yield where, tokens
                        if example is None:
                            break
                finally:
                    close = getattr(examples, "close", None)
                    if close is not None:
                        close()
                shard_rank, state = shard_rank + 1, None
            if not found and position["shard"] == 0 and position["state"] is None:
                raise ValueError("the streamed dataset yielded no usable document")
            epoch, shard_rank = epoch + 1, 0
            position = {"epoch": epoch, "shard": 0, "state": None}
            logger.info(f"data: starting epoch {epoch} over {len(self.shards)} shards")


class PackedBatches:
    """(batch, seq_len) int64 batches cut from the concatenated documents (each followed by end-of-text).

    Its position is the document the next batch starts in and the offset of the first unused token in it, so a
    stream restored from state_dict() continues with exactly the tokens the original would have produced."""

    def __init__(self, documents: IndexedDocuments | StreamedDocuments, *, batch_size: int, seq_len: int):
        self.documents, self.batch_size, self.seq_len = documents, batch_size, seq_len
        self.batches_drawn = 0
        self._position, self._offset = documents.first_position(), 0
        self._iterator: Iterator[tuple[dict, list[int]]] | None = None
        self._current: list[int] | None = None  # the tokens of the document at _position, once read

    def __iter__(self) -> PackedBatches:
        return self

    def _read_next_document(self) -> None:
        if self._iterator is None:  # (re)start reading at the saved position: that document comes first
            self._iterator = self.documents.documents(self._position)
        self._position, self._current = next(self._iterator)

    def __next__(self) -> torch.Tensor:
        needed = self.batch_size * self.seq_len
        tokens: list[int] = []
        while len(tokens) < needed:
            if self._current is None:
                self._read_next_document()
            take = min(needed - len(tokens), len(self._current) - self._offset)
            tokens.extend(self._current[self._offset : self._offset + take])
            self._offset += take
            if self._offset == len(self._current):
                self._read_next_document()
                self._offset = 0
        self.batches_drawn += 1
        return torch.tensor(tokens, dtype=torch.long).view(self.batch_size, self.seq_len)

    def state_dict(self) -> dict:
        """A JSON-serializable position: where the next batch starts."""
        return {
            "kind": "documents",
            "layout": self.documents.layout(),
            "position": self._position,
            "offset": self._offset,
            "batches_drawn": self.batches_drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of a stream over the same documents (any seed-matched instance)."""
        if state.get("kind") != "documents" or state.get("layout") != self.documents.layout():
            raise ValueError(
                "the saved data position belongs to another dataset or data layout "
                f"({state.get('kind')} {state.get('layout')}, now {self.documents.layout()}); "
                "resume with the same --dataset, --split and --data-shard"
            )
        self._position, self._offset = state["position"], int(state["offset"])
        self.batches_drawn = int(state.get("batches_drawn", 0))
        self._iterator, self._current = None, None


def _leading_documents(
    dataset, text_field: str, tokenizer: Tokenizer, num_tokens: int
) -> tuple[list[int], list]:
    """Tokens (documents joined by end-of-text) and texts of the first documents, until num_tokens tokens."""
    tokens: list[int] = []
    texts: list[str] = []
    if num_tokens <= 0:
        return tokens, texts
    if is_indexed(dataset):
        rows = (
            dataset[i : i + TOKENIZE_BATCH_DOCS][text_field]
            for i in range(0, len(dataset), TOKENIZE_BATCH_DOCS)
        )
    else:
        rows = (batch[text_field] for batch in dataset.iter(batch_size=TOKENIZE_BATCH_DOCS))
    for batch in rows:
        batch = [text for text in batch if text]
        texts.extend(batch)
        for ids in _encode(tokenizer, batch):
            tokens.extend(ids)
        if len(tokens) >= num_tokens:
            break
    return tokens[:num_tokens], texts


def _trailing_documents(
    dataset, text_field: str, tokenizer: Tokenizer, num_tokens: int
) -> tuple[list[int], int]:
    """Tokens of the last documents of an indexed dataset (at most a tenth of them), until num_tokens tokens;
    and how many documents they are."""
    num_docs_max = len(dataset) // 10
    chunks: list[list[int]] = []
    num_found = num_docs = 0
    end = len(dataset)
    while num_found < num_tokens and num_docs < num_docs_max:
        start = max(end - TOKENIZE_BATCH_DOCS, len(dataset) - num_docs_max)
        texts = dataset[start:end][text_field]
        for ids in reversed(_encode(tokenizer, [t for t in texts if t])):
            chunks.append(ids)
            num_found += len(ids)
        num_docs += end - start
        end = start
    tokens = [t for ids in reversed(chunks) for t in ids]
    return tokens[:num_tokens], num_docs


@dataclass(frozen=True, kw_only=True)
class DocumentCorpus:
    """An opened real dataset: the same held-out tokens for every peer, and per-peer training streams."""

    source: DocumentSource
    tokenizer: Tokenizer
    dataset: Any
    """The training split: a datasets.Dataset (memory-mapped) or IterableDataset (streamed)."""
    eval: torch.Tensor
    """(num_eval_tokens,) int32 held-out tokens, identical on every peer."""
    train_end: int
    """Indexed datasets: documents [0, train_end) are trained on, the rest is the held-out slice."""
    excluded: frozenset[bytes]
    """Streamed datasets: keys of the held-out documents, skipped when they come by in training."""

    @property
    def description(self) -> str:
        where = f"{self.source.dataset}" + (
            f" ({self.source.dataset_config})" if self.source.dataset_config else ""
        )
        if is_indexed(self.dataset):
            size = f"{self.train_end} training documents"
        else:
            size = f"streamed, {self.dataset.num_shards} shards"
        return f"{where} split {self.source.split}, {size}, {len(self.eval)} held-out tokens"

    def train_stream(
        self, *, seed: int, batch_size: int, seq_len: int, shard: tuple[int, int] | None = None
    ) -> PackedBatches:
        """This peer's endless training batches; `seed` sets its order, `shard` 'i/n' a disjoint slice."""
        if is_indexed(self.dataset):
            from peer.data import shard_slice

            start, end = shard_slice(self.train_end, shard)
            documents: IndexedDocuments | StreamedDocuments = IndexedDocuments(
                self.dataset,
                text_field=self.source.text_field,
                tokenizer=self.tokenizer,
                start=start,
                end=end,
                seed=seed,
            )
        else:
            documents = StreamedDocuments(
                self.dataset,
                text_field=self.source.text_field,
                tokenizer=self.tokenizer,
                seed=seed,
                shard=shard,
                excluded=self.excluded,
            )
        return PackedBatches(documents, batch_size=batch_size, seq_len=seq_len)

    def eval_batches(self, *, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
        from peer.data import eval_batches

        return eval_batches(self.eval, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)


def open_documents(source: DocumentSource, tokenizer: Tokenizer, *, eval_tokens: int) -> DocumentCorpus:
    """Open the dataset, check its text field and cut the held-out slice; nothing is read beyond that slice."""
    dataset = load_split(source, source.split)
    check_text_field(dataset, source)
    field = source.text_field
    indexed = is_indexed(dataset)
    train_end = len(dataset) if indexed else 0
    excluded: frozenset[bytes] = frozenset()
    if source.eval_split is not None:
        held_out = load_split(source, source.eval_split)
        check_text_field(held_out, DocumentSource(**{**source.__dict__, "split": source.eval_split}))
        tokens, _ = _leading_documents(held_out, field, tokenizer, eval_tokens)
    elif indexed:
        tokens, num_docs = _trailing_documents(dataset, field, tokenizer, eval_tokens)
        train_end -= num_docs
    else:
        tokens, texts = _leading_documents(dataset, field, tokenizer, eval_tokens)
        excluded = frozenset(_text_key(text) for text in texts)
    if indexed and train_end < 1:
        raise ValueError(f"dataset {source.dataset} has {len(dataset)} documents: too few to train on")
    return DocumentCorpus(
        source=source,
        tokenizer=tokenizer,
        dataset=dataset,
        eval=torch.tensor(tokens, dtype=torch.int32),
        train_end=train_end,
        excluded=excluded,
    )


def tokens_in_memory(
    source: DocumentSource, tokenizer: Tokenizer, *, eval_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training tokens, held-out tokens) of a local dataset, all in memory: its training documents in order, each
    followed by end-of-text (for the in-process simulation, which samples windows like the embedded corpus)."""
    corpus = open_documents(source, tokenizer, eval_tokens=eval_tokens)
    if not is_indexed(corpus.dataset):
        raise ValueError(
            f"dataset {source.dataset} is streamed and does not fit in memory; use a local dataset"
        )
    ids: list[int] = []
    for start in range(0, corpus.train_end, TOKENIZE_BATCH_DOCS):
        texts = corpus.dataset[start : min(start + TOKENIZE_BATCH_DOCS, corpus.train_end)][source.text_field]
        for doc in _encode(tokenizer, [text for text in texts if text]):
            ids.extend(doc)
    return torch.tensor(ids, dtype=torch.int32), corpus.eval
