"""Corpus -> tokens -> fixed-length training batches per peer, plus a fixed held-out slice for evaluation."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.config import DataConfig

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_CORPUS = ASSETS / "corpus.jsonl.gz"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer.json"
# Streaming hub datasets are read up to this many tokens per peer start; enough for many rounds and bounded.
STREAM_TOKEN_BUDGET = 50_000_000


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


@dataclass(frozen=True)
class TokenCorpus:
    """All tokens of the corpus, split into a training part and a held-out tail."""

    train: torch.Tensor  # (num_train_tokens,) int32
    eval: torch.Tensor  # (num_eval_tokens,) int32


def read_embedded_documents() -> list[dict]:
    """The works of the embedded corpus: [{'title', 'author', 'text'}], in a fixed order."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _read_documents(dataset: str) -> list[str]:
    if dataset == "embedded":
        return [doc["text"] for doc in read_embedded_documents()]
    if os.path.exists(dataset):
        if dataset.endswith((".txt", ".md")):
            return [Path(dataset).read_text(encoding="utf-8")]
        import datasets  # lazy: datasets is slow to import and only needed for real data

        kind = "json" if dataset.endswith((".json", ".jsonl", ".jsonl.gz", ".json.gz")) else "text"
        table = datasets.load_dataset(kind, data_files=dataset, split="train")
        return list(table["text"])
    return list(_stream_hub_documents(dataset))


def _stream_hub_documents(name: str) -> Iterator[str]:
    """Documents of a Hugging Face hub dataset, streamed (needs network access to the hub)."""
    import datasets

    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as exc:  # datasets raises many types for an unknown or unreachable dataset
        raise ValueError(f"cannot load dataset {name!r}: {exc}") from None
    num_chars = 0
    for record in stream:
        text = record.get("text") or ""
        num_chars += len(text)
        yield text
        if num_chars > 4 * STREAM_TOKEN_BUDGET:
            return


def _cache_path(dataset: str, tokenizer: Tokenizer) -> Path | None:
    """Where the tokens of a local corpus are cached (tokenizing the embedded corpus takes seconds)."""
    source = EMBEDDED_CORPUS if dataset == "embedded" else Path(dataset)
    if not source.is_file():
        return None
    stat = source.stat()
    key = hashlib.sha256(
        f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{tokenizer.id}".encode()
    ).hexdigest()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diloco-swarm"
    return cache_root / f"tokens-{key[:24]}.pt"


def _tokenize_cached(dataset: str, tokenizer: Tokenizer) -> torch.Tensor:
    cache = _cache_path(dataset, tokenizer)
    if cache is not None and cache.exists():
        try:
            return torch.load(cache)
        except Exception:
            pass  # a damaged cache is rebuilt below
    tokens = tokenizer.encode_documents(_read_documents(dataset))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            torch.save(tokens, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the next start a few seconds
    return tokens


def load_corpus(config: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    """Tokenize the whole corpus (cached for local files) and cut off the evaluation tail."""
    tokens = _tokenize_cached(config.dataset, tokenizer)
    num_eval = min(config.eval_tokens, len(tokens) // 10)
    train = tokens[: len(tokens) - num_eval]
    if len(train) < 4 * (config.seq_len + 1):
        raise ValueError(f"dataset {config.dataset!r} has only {len(train)} training tokens: too small")
    return TokenCorpus(train=train, eval=tokens[len(tokens) - num_eval :])


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


def eval_batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, num_batches: int
) -> list[torch.Tensor]:
    """Fixed, non-overlapping windows of the held-out tail, the same on every peer."""
    windows = tokens[: (len(tokens) // seq_len) * seq_len].view(-1, seq_len).long()
    return [
        windows[i : i + batch_size] for i in range(0, min(len(windows), batch_size * num_batches), batch_size)
    ]
