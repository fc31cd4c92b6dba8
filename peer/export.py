"""Export the global parameters of a checkpoint as a Hugging Face model directory (safetensors weights, config,
tokenizer, generation config) that `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained` load.

    python -m peer.export --checkpoint ckpt/ --out my-model   # a checkpoint file, or a directory: newest usable
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from peer.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint
from peer.data import EMBEDDED_TOKENIZER, Tokenizer
from peer.model import build_model, load_model_config
from peer.outer import tensors_sha256

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The embedded tokenizer's one special token ends every document in training; it is also what generation stops at.
EMBEDDED_SPECIAL = "<|endoftext|>"


def read_checkpoint(path: str) -> tuple[Path, dict]:
    """A checkpoint file, or the newest usable checkpoint of a directory."""
    where = Path(path)
    if where.is_dir():
        found = latest_valid_checkpoint(str(where))
        if found is None:
            raise CheckpointError(f"no checkpoint in {where}")
        return found
    return where, load_checkpoint(where)


def global_model(state: dict) -> torch.nn.Module:
    """The transformers model of the run with the checkpoint's global parameters, verified against its hash."""
    config = state["config"]
    tokenizer = Tokenizer(config["data"]["tokenizer"])
    model_config = load_model_config(
        config["model"]["name"], vocab_size=tokenizer.vocab_size, max_seq_len=config["data"]["seq_len"]
    )
    model = build_model(model_config, seed=config.get("seed", 0))
    named = list(model.named_parameters())
    outer = state["outer_state"]
    if len(outer) != 2 * len(named):
        raise CheckpointError(
            f"the checkpoint holds {len(outer)} outer tensors; this model needs {2 * len(named)}"
        )
    saved_names = state.get("param_names")
    if saved_names is not None and saved_names != [name for name, _ in named]:
        raise CheckpointError("the checkpoint's parameter names do not match the model built from its config")
    global_params = outer[: len(named)]
    if state.get("params_sha256") and tensors_sha256(global_params) != state["params_sha256"]:
        raise CheckpointError("the checkpoint's global parameters do not match their recorded hash")
    with torch.no_grad():
        for (name, param), value in zip(named, global_params, strict=True):
            if param.shape != value.shape:
                raise CheckpointError(
                    f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(param.shape)}"
                )
            param.copy_(value)
    return model


def is_tokenizer_file(spec: str) -> bool:
    return spec == "embedded" or spec.endswith(".json")


def pretrained_tokenizer(spec: str):
    """The run's tokenizer as a transformers tokenizer (a tokenizer.json becomes a PreTrainedTokenizerFast)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if is_tokenizer_file(spec):
        path = EMBEDDED_TOKENIZER if spec == "embedded" else Path(spec)
        special = {"bos_token", "eos_token", "unk_token", "pad_token"}
        if EMBEDDED_SPECIAL in json.loads(path.read_text()).get("model", {}).get("vocab", {}):
            return PreTrainedTokenizerFast(
                tokenizer_file=str(path), **dict.fromkeys(special, EMBEDDED_SPECIAL)
            )
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    return AutoTokenizer.from_pretrained(spec)


def export(state: dict, out: Path, *, dtype: torch.dtype = torch.float32, source: str = "") -> None:
    """Write `out` (which must not exist or be empty) in one step: built in a temporary directory beside it."""
    from transformers import GenerationConfig

    model = global_model(state)
    spec = state["config"]["data"]["tokenizer"]
    tokenizer = pretrained_tokenizer(spec)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    model.config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.model_max_length = state["config"]["data"]["seq_len"]  # what the run trained on
        tokenizer.save_pretrained(staging)
        if is_tokenizer_file(spec):  # name the class older transformers versions know too
            config_path = staging / "tokenizer_config.json"
            config_path.write_text(
                json.dumps(
                    {**json.loads(config_path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}
                )
            )
        GenerationConfig.from_model_config(model.config).save_pretrained(staging)
        provenance = {
            key: state.get(key) for key in ("round", "fingerprint", "params_sha256") if key in state
        } | {"run_id": state["config"].get("swarm", {}).get("run_id"), "source": source, "dtype": str(dtype)}
        (staging / "diloco_swarm.json").write_text(json.dumps(provenance, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peer.export",
        description="Write a run's global parameters as a Hugging Face model directory.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint file (round-N.safetensors) or a checkpoint directory (its newest usable checkpoint)",
    )
    parser.add_argument("--out", required=True, help="the directory to create (must not exist, or be empty)")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="weight dtype of the export (default: float32)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: --out {out} already exists and is not an empty directory", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).exists():
        print(f"error: --checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    try:
        path, state = read_checkpoint(args.checkpoint)
        export(state, out, dtype=DTYPES[args.dtype], source=str(path))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported round {state.get('round')} of {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
