"""Atomic checkpoints as safetensors (named tensors) plus JSON metadata, verified by checksum; loading one reads
tensors and JSON only, never pickled code. The newest usable checkpoint wins; a corrupt one is skipped, with a log."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NAME = re.compile(r"^round-(\d+)\.safetensors$")
FORMAT = "diloco-swarm-checkpoint/1"
METADATA_KEY = "diloco_swarm"
# Markers in the JSON skeleton of a state dict (keys a real state never uses).
TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, wrong model); the message says which file and why."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path), fsync it, rename it over `path`, fsync the directory: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tensor_names(state: dict) -> dict[tuple, str]:
    """Readable names for the outer state when the state says which parameter each tensor belongs to:
    global.<param> and outer_momentum.<param> instead of outer_state.<i>."""
    names, outer = state.get("param_names"), state.get("outer_state")
    if not names or not isinstance(outer, list | tuple) or len(outer) != 2 * len(names):
        return {}
    found = {("outer_state", i): f"global.{name}" for i, name in enumerate(names)}
    found.update({("outer_state", len(names) + i): f"outer_momentum.{name}" for i, name in enumerate(names)})
    return found


def split_state(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A nested state dict -> (a JSON skeleton, named tensors). Tensors become {"__tensor__": name}; tuples and
    dicts with int keys (an optimizer's per-parameter state) are marked so that join_state restores them."""
    tensors: dict[str, torch.Tensor] = {}
    names = _tensor_names(state)
    storages: set[int] = set()

    def encode(value, path: tuple):
        if isinstance(value, torch.Tensor):
            name = names.get(path, ".".join(str(p) for p in path))
            assert name not in tensors, f"two tensors named {name}"
            tensor = value.detach().cpu().contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages and tensor.numel():  # safetensors stores no aliases: give it its own copy
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
            return {TENSOR: name}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            assert all(isinstance(k, int) for k in value), f"keys of {path} must be all str or all int"
            return {INT_KEYS: {str(k): encode(v, (*path, k)) for k, v in value.items()}}
        if isinstance(value, tuple):
            return {TUPLE: [encode(v, (*path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, (*path, i)) for i, v in enumerate(value)]
        assert value is None or isinstance(value, str | int | float | bool), f"{path}: {type(value)}"
        return value

    return encode(state, ()), tensors


def join_state(skeleton, tensors: dict[str, torch.Tensor]):
    """The inverse of split_state."""
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if TENSOR in skeleton:
        return tensors[skeleton[TENSOR]]
    if TUPLE in skeleton:
        return tuple(join_state(v, tensors) for v in skeleton[TUPLE])
    if INT_KEYS in skeleton:
        return {int(k): join_state(v, tensors) for k, v in skeleton[INT_KEYS].items()}
    return {k: join_state(v, tensors) for k, v in skeleton.items()}


def checkpoint_path(directory: str, round_index: int) -> Path:
    return Path(directory) / f"round-{round_index:06d}.safetensors"


def save_checkpoint(directory: str, state: dict, *, round_index: int, keep: int) -> Path:
    """Write round-N.safetensors and its .sha256 atomically (temp file, fsync, rename); keep the newest `keep`.

    `state` is any nesting of dicts, lists and tuples with tensors, str, numbers, bool and None inside (the
    peer's: round, outer_state, inner_optimizer, config, fingerprint, params_sha256, data_position and,
    for readable tensor names, param_names). Tensors are stored by name, the rest as JSON metadata."""
    from safetensors.torch import save_file  # lazy: only peers with a checkpoint directory need it

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, round_index)
    skeleton, tensors = split_state(state)
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "state": skeleton}, allow_nan=True)}
    _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    checksum = _sha256_file(path).encode()

    def write_checksum(tmp: Path) -> None:
        tmp.write_bytes(checksum)

    _write_atomic(path.with_suffix(".sha256"), write_checksum)
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
    from safetensors import safe_open

    path = Path(path)
    sidecar = path.with_suffix(".sha256")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not sidecar.exists():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}; refusing to load it")
    if _sha256_file(path) != sidecar.read_text().strip():
        raise CheckpointError(
            f"checkpoint {path} is corrupted (checksum mismatch); delete it or restore a copy"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            header = json.loads((file.metadata() or {})[METADATA_KEY])
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
        if header.get("format") != FORMAT:
            raise ValueError(f"unknown format {header.get('format')!r}")
        return join_state(header["state"], tensors)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None


def latest_valid_checkpoint(directory: str) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, skipping (and logging) unusable newer ones; None for an empty directory.
    Raises CheckpointError if there are checkpoints but none of them is usable."""
    found = list_checkpoints(directory)
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            logger.warning(f"{e}; trying the previous checkpoint")
            problems.append(str(e))
            continue
        if problems:
            logger.warning(f"using {path.name}, the newest usable checkpoint in {directory}")
        return path, state
    if problems:
        raise CheckpointError(f"no usable checkpoint in {directory}: {'; '.join(problems)}")
    if any(Path(directory).glob("round-*.pt")):
        raise CheckpointError(
            f"{directory} holds only old pickle checkpoints (round-*.pt), which are not loaded because loading "
            "them can run code; start without --resume or use another --checkpoint-dir"
        )
    return None


def load_latest_checkpoint(directory: str) -> dict | None:
    """The state of latest_valid_checkpoint(directory), or None if the directory holds no checkpoint."""
    found = latest_valid_checkpoint(directory)
    return None if found is None else found[1]
