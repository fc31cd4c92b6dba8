"""Atomic checkpoints: global params, outer momentum, inner optimizer, round and config, verified by checksum."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

NAME = re.compile(r"^round-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, wrong model); the message says which file and why."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(directory: str, state: dict, *, round_index: int, keep: int) -> Path:
    """Write round-N.pt and its .sha256 atomically (temp file, fsync, rename); keep only the newest `keep`."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{round_index:06d}.pt"
    _write_atomic(path, lambda file: torch.save(state, file))
    checksum = _sha256_file(path).encode()
    _write_atomic(path.with_suffix(".sha256"), lambda file: file.write(checksum))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str) -> list[Path]:
    """Checkpoints in the directory, oldest first."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if NAME.match(p.name)), key=lambda p: int(NAME.match(p.name)[1])
    )


def load_checkpoint(path: Path) -> dict:
    """Load after verifying the checksum; raises CheckpointError with a clear reason otherwise."""
    sidecar = path.with_suffix(".sha256")
    if not sidecar.exists():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}; refusing to load it")
    if _sha256_file(path) != sidecar.read_text().strip():
        raise CheckpointError(
            f"checkpoint {path} is corrupted (checksum mismatch); delete it or restore a copy"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def load_latest_checkpoint(directory: str) -> dict | None:
    found = list_checkpoints(directory)
    return load_checkpoint(found[-1]) if found else None
