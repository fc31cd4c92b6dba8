"""The embedded corpus and tokenizer shipped in peer/assets load offline and are fit for the demo."""

from __future__ import annotations

import gzip
import json
from importlib.resources import files

import pytest

ASSETS = files("peer") / "assets"
END_OF_TEXT = "<|endoftext|>"

# Public domain, and in neither Shakespeare nor Austen: a fair held-out sample of English.
HELD_OUT_ENGLISH = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political "
    "bands which have connected them with another, and to assume among the powers of the earth, the "
    "separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent "
    "respect to the opinions of mankind requires that they should declare the causes which impel them "
    "to the separation.\n\nWe hold these truths to be self-evident, that all men are created equal, that "
    "they are endowed by their Creator with certain unalienable Rights, that among these are Life, "
    "Liberty and the pursuit of Happiness.\n"
)


@pytest.fixture(scope="module")
def works() -> list[dict]:
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ASSETS / "tokenizer.json"))


def test_corpus_has_several_works_and_over_a_million_characters(works):
    assert len(works) >= 40
    assert {w["author"] for w in works} == {"Jane Austen", "William Shakespeare"}
    assert all(set(w) == {"title", "author", "text"} and w["text"].strip() for w in works)
    assert sum(len(w["text"]) for w in works) > 6_000_000
    # Sorted by (author, title) with no duplicates, so every peer sees the same order.
    keys = [(w["author"], w["title"]) for w in works]
    assert keys == sorted(set(keys))


def test_corpus_is_clean_text(works):
    hamlet = next(w["text"] for w in works if w["title"] == "Hamlet")
    assert "To be, or not to be" in hamlet
    for w in works:
        assert "\r" not in w["text"] and "\t" not in w["text"], w["title"]
        assert "Gutenberg" not in w["text"], w["title"]
        assert "\n\n\n\n" not in w["text"], w["title"]
        assert w["text"].endswith("\n") and not w["text"].endswith("\n\n"), w["title"]


def test_tokenizer_vocab_and_special_token(tokenizer):
    assert tokenizer.get_vocab_size() == 8192
    assert tokenizer.token_to_id(END_OF_TEXT) == 0


@pytest.mark.parametrize(
    "text",
    [
        HELD_OUT_ENGLISH,
        "  Leading spaces,\ttabs,\r\nCRLF and trailing spaces  \n",
        "Café — naïve 日本語 🙂 and bytes the corpus never saw: \x00\x7f",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_loads_in_transformers():
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer.json"), eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )
    assert len(hf) == 8192
    assert hf.eos_token_id == hf.pad_token_id == 0
    ids = hf.encode(HELD_OUT_ENGLISH)
    assert hf.decode(ids) == HELD_OUT_ENGLISH
    # The end-of-text marker is one token, not spelled out in pieces.
    assert hf.encode("a" + END_OF_TEXT + "b")[1] == 0


def test_tokenizer_compresses_english(tokenizer, works):
    # Measured when the assets were built: 3.86 chars/token on the held-out text,
    # 3.79 on the start of Pride and Prejudice; a bytes-only vocabulary would give about 1.
    held_out_ratio = len(HELD_OUT_ENGLISH) / len(tokenizer.encode(HELD_OUT_ENGLISH).ids)
    assert held_out_ratio > 3.5
    novel = next(w["text"] for w in works if w["title"] == "Pride and Prejudice")[:50_000]
    assert len(novel) / len(tokenizer.encode(novel).ids) > 3.5
