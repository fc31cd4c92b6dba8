"""Corpus -> tokens -> fixed-length training batches per peer, plus a fixed held-out slice for evaluation.

The loop uses open_corpus() once, then corpus.train_stream(...) (a BatchStream: next batch, position to save and
restore) and corpus.eval_batches(...). The embedded corpus is sampled here; real datasets live in documents.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from peer.config import DataConfig

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_CORPUS = ASSETS / "corpus.jsonl.gz"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer.json"


class Tokenizer:
    """A thin wrapper so the rest of the code does not care where the tokenizer came from."""

    def __init__(self, spec: str):
        if spec == "embedded" or spec.endswith(".json"):
            from tokenizers import Tokenizer as FastTokenizer

            path = EMBEDDED_TOKENIZER if spec == "embedded" else Path(spec)
            if not path.exists():
                raise ValueError(f"tokenizer file {path} does not exist")
            self._fast = FastTokenizer.from_file(str(path))
            self.vocab_size = self._fast.get_vocab_size()
            self.id = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            self._encode = lambda texts: [enc.ids for enc in self._fast.encode_batch(texts)]
            self.eos_id = self._fast.token_to_id("<|endoftext|>")
        else:
            from transformers import AutoTokenizer  # lazy: only for tokenizers that are not a plain file

            hf = AutoTokenizer.from_pretrained(spec)
            self.vocab_size = len(hf)
            self.id = spec
            self._encode = lambda texts: hf(texts, add_special_tokens=False)["input_ids"]
            self.eos_id = hf.eos_token_id
        if self.eos_id is None:
            self.eos_id = 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)

    def encode_documents(self, texts: list[str]) -> torch.Tensor:
        """Concatenate documents into one token stream, separated by the end-of-text token."""
        ids: list[int] = []
        for doc in self.encode(texts):
            ids.extend(doc)
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.int32)


class BatchStream(Protocol):
    """A peer's endless training batches, with a position to save in a checkpoint and restore."""

    def __next__(self) -> torch.Tensor:
        """The next (batch_size, seq_len) int64 batch of token ids."""
        ...

    def __iter__(self) -> BatchStream: ...

    def state_dict(self) -> dict:
        """Where the next batch starts: a small JSON-serializable dict."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that produced `state` was (same corpus, seed, shard, sizes)."""
        ...


class Corpus(Protocol):
    """An opened corpus: the same held-out batches on every peer, and a training stream per peer."""

    @property
    def description(self) -> str: ...

    def train_stream(
        self, *, seed: int, batch_size: int, seq_len: int, shard: tuple[int, int] | None = None
    ) -> BatchStream: ...

    def eval_batches(self, *, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class TokenCorpus:
    """All tokens of the corpus, split into a training part and a held-out tail."""

    train: torch.Tensor  # (num_train_tokens,) int32
    eval: torch.Tensor  # (num_eval_tokens,) int32

    @property
    def description(self) -> str:
        return f"{len(self.train)} training tokens, {len(self.eval)} held-out tokens (in memory)"

    def train_stream(
        self, *, seed: int, batch_size: int, seq_len: int, shard: tuple[int, int] | None = None
    ) -> WindowStream:
        return WindowStream(self.train, seed=seed, batch_size=batch_size, seq_len=seq_len, shard=shard)

    def eval_batches(self, *, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
        return eval_batches(self.eval, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)


def read_embedded_documents() -> list[dict]:
    """The works of the embedded corpus: [{'title', 'author', 'text'}], in a fixed order."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _cache_path(tokenizer: Tokenizer) -> Path:
    """Where the embedded corpus's tokens are cached (tokenizing it takes seconds)."""
    stat = EMBEDDED_CORPUS.stat()
    key = hashlib.sha256(
        f"{EMBEDDED_CORPUS.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{tokenizer.id}".encode()
    ).hexdigest()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diloco-swarm"
    return cache_root / f"tokens-{key[:24]}.safetensors"


def _embedded_tokens(tokenizer: Tokenizer) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    cache = _cache_path(tokenizer)
    if cache.exists():
        try:
            return load_file(cache)["tokens"]
        except Exception:
            pass  # a damaged cache is rebuilt below
    tokens = tokenizer.encode_documents([doc["text"] for doc in read_embedded_documents()])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        save_file({"tokens": tokens}, str(tmp))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs the next start a few seconds
    return tokens


def load_corpus(config: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    """The whole corpus tokenized in memory: the embedded corpus (its tail held out), or a local dataset (its
    documents in order; the same held-out slice as open_corpus). Streamed datasets do not fit: use open_corpus."""
    if config.dataset != "embedded":
        from peer.data_source import DocumentSource
        from peer.documents import tokens_in_memory

        source = DocumentSource.from_config(config)
        train, held_out = tokens_in_memory(source, tokenizer, eval_tokens=config.eval_tokens)
    else:
        tokens = _embedded_tokens(tokenizer)
        num_eval = min(config.eval_tokens, len(tokens) // 10)
        train, held_out = tokens[: len(tokens) - num_eval], tokens[len(tokens) - num_eval :]
    if len(train) < 4 * (config.seq_len + 1):
        raise ValueError(f"dataset {config.dataset!r} has only {len(train)} training tokens: too small")
    return TokenCorpus(train=train, eval=held_out)


def shard_slice(num_tokens: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, end) of the i-th of n contiguous, disjoint slices; the whole range without a shard."""
    if shard is None:
        return 0, num_tokens
    index, count = shard
    return num_tokens * index // count, num_tokens * (index + 1) // count


def data_seed(base_seed: int, stream_id: str) -> int:
    """A 63-bit seed for one peer's data order, derived from the run seed and the peer's id or shard."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{stream_id}".encode()).digest()[:8], "big") >> 1


def train_batches(
    tokens: torch.Tensor,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard: tuple[int, int] | None = None,
    skip: int = 0,
) -> Iterator[torch.Tensor]:
    """Endless random windows of seq_len tokens from this peer's slice; deterministic given the seed.
    `skip` batches are drawn and dropped first (to continue exactly where a checkpoint left off)."""
    start, end = shard_slice(len(tokens), shard)
    if end - start <= seq_len:
        raise ValueError(f"data shard {shard} holds {end - start} tokens, fewer than --seq-len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    for _ in range(skip):
        torch.randint(start, end - seq_len, (batch_size,), generator=generator)
    while True:
        starts = torch.randint(start, end - seq_len, (batch_size,), generator=generator)
        yield tokens[starts[:, None] + offsets].long()  # (batch, seq_len)


class WindowStream:
    """train_batches() as a BatchStream: its position is the number of batches drawn."""

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        seed: int,
        batch_size: int,
        seq_len: int,
        shard: tuple[int, int] | None = None,
    ):
        self._make = lambda skip: train_batches(
            tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, shard=shard, skip=skip
        )
        self._batches = self._make(0)
        self.batches_drawn = 0

    def __iter__(self) -> WindowStream:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._batches)
        self.batches_drawn += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "windows", "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "windows") != "windows":
            raise ValueError(f"the saved data position is for another kind of corpus ({state.get('kind')})")
        self.batches_drawn = int(state["batches_drawn"])
        self._batches = self._make(self.batches_drawn)


def open_corpus(config: DataConfig, tokenizer: Tokenizer) -> Corpus:
    """The embedded corpus (in memory, as load_corpus), or a real dataset read document by document (streamed
    or memory-mapped; see peer.documents). Raises ValueError with a clear message for a bad dataset or field."""
    if config.dataset == "embedded":
        return load_corpus(config, tokenizer)
    from peer.data_source import DocumentSource
    from peer.documents import open_documents

    return open_documents(DocumentSource.from_config(config), tokenizer, eval_tokens=config.eval_tokens)


def eval_batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, num_batches: int
) -> list[torch.Tensor]:
    """Fixed, non-overlapping windows of the held-out tail, the same on every peer."""
    windows = tokens[: (len(tokens) // seq_len) * seq_len].view(-1, seq_len).long()
    return [
        windows[i : i + batch_size] for i in range(0, min(len(windows), batch_size * num_batches), batch_size)
    ]
