"""Export a run's global parameters as a Hugging Face model directory (safetensors weights, config, tokenizer,
generation config) that `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained` load.

    python -m peer.export --checkpoint ckpt/ --out my-model        # a checkpoint file, or a directory: newest usable
    python -m peer.export --initial-peers ADDR --run-id RUN --out my-model   # from a live swarm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint
from peer.data import EMBEDDED_TOKENIZER, Tokenizer
from peer.model import architecture, build_model, load_model_config
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


@dataclass
class Exportable:
    """A run's model holding its global parameters, with what goes beside it in the export."""

    model: torch.nn.Module
    tokenizer: str
    """The run's tokenizer: 'embedded', a tokenizer.json path or a Hugging Face name."""
    max_length: int
    """Tokens per sequence the run trained on."""
    provenance: dict


def load_global_params_(
    model: torch.nn.Module, global_params: list[torch.Tensor], *, expected_sha256: str | None
) -> None:
    """Copy the global parameters (in model.parameters() order) into the model, checked against their hash."""
    named = list(model.named_parameters())
    if len(global_params) != len(named):
        raise CheckpointError(f"{len(global_params)} global parameter tensors; this model has {len(named)}")
    if expected_sha256 and tensors_sha256(global_params) != expected_sha256:
        raise CheckpointError("the global parameters do not match their recorded hash")
    with torch.no_grad():
        for (name, param), value in zip(named, global_params, strict=True):
            if param.shape != value.shape:
                raise CheckpointError(
                    f"{name}: shape {tuple(value.shape)} given, the model has {tuple(param.shape)}"
                )
            param.copy_(value)


def from_checkpoint(path: Path, state: dict) -> Exportable:
    """The model of a checkpoint's run (rebuilt from its saved config) with its global parameters."""
    config = state["config"]
    if isinstance(state.get("model_config"), dict):  # the exact transformers config the run trained
        model_config = config_from_dict(state["model_config"])
    else:  # rebuilt from the run's --model (a preset, or a config that must exist here too)
        tokenizer = Tokenizer(config["data"]["tokenizer"])
        model_config = load_model_config(
            config["model"]["name"],
            vocab_size=tokenizer.vocab_size,
            max_seq_len=config["data"]["seq_len"],
            pretrained=config["model"].get("init_from") is not None,
        )
    model = build_model(model_config, seed=config.get("seed", 0))
    names = [name for name, _ in model.named_parameters()]
    if state.get("param_names") not in (None, names):
        raise CheckpointError("the checkpoint's parameter names do not match the model built from its config")
    outer = state["outer_state"]
    if len(outer) != 2 * len(names):
        raise CheckpointError(
            f"the checkpoint holds {len(outer)} outer tensors; this model needs {2 * len(names)}"
        )
    load_global_params_(model, outer[: len(names)], expected_sha256=state.get("params_sha256"))
    provenance = {key: state.get(key) for key in ("round", "fingerprint", "params_sha256")}
    provenance.update(run_id=config.get("swarm", {}).get("run_id"), source=str(path))
    return Exportable(model, config["data"]["tokenizer"], config["data"]["seq_len"], provenance)


def config_from_dict(values: dict):
    """A transformers config from its to_dict() (as a checkpoint saves it)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in values.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(values["model_type"], **fields)
    except Exception as e:
        raise CheckpointError(f"the checkpoint's model config cannot be used: {e}") from None


# Bounds on a model architecture read from the swarm (another peer's record): nothing absurd gets allocated.
MAX_PARAMS = 50_000_000_000


def config_from_architecture(arch: dict):
    """A transformers config with the shapes a run publishes (peer.model.architecture); other fields default."""
    from transformers import AutoConfig

    shapes = {k: v for k, v in arch.items() if k != "model_type" and v is not None}
    if not isinstance(arch.get("model_type"), str) or not all(
        isinstance(v, bool) or (isinstance(v, int) and 0 < v < 10_000_000) for v in shapes.values()
    ):
        raise ValueError(f"the run publishes an unusable model architecture: {arch}")
    hidden, layers = shapes.get("hidden_size", 0), shapes.get("num_hidden_layers", 0)
    estimate = 2 * shapes.get("vocab_size", 0) * hidden + layers * (
        4 * hidden**2 + 3 * hidden * shapes.get("intermediate_size", 0)
    )
    if estimate > MAX_PARAMS:
        raise ValueError(f"the run publishes a model of about {estimate / 1e9:.0f}B parameters; refusing")
    try:
        return AutoConfig.for_model(arch["model_type"], **shapes)
    except Exception as e:
        raise ValueError(f"cannot build the run's model ({arch['model_type']}): {e}") from None


def run_tokenizer(tokenizer_id: str, given: str | None) -> str:
    """The tokenizer spec for the run's tokenizer id (a file's sha256, or a Hugging Face name)."""
    if given is not None:
        if Tokenizer(given).id != tokenizer_id:
            raise ValueError(f"--tokenizer {given} is not the run's tokenizer ({tokenizer_id})")
        return given
    if Tokenizer("embedded").id == tokenizer_id:
        return "embedded"
    if tokenizer_id.startswith("sha256:"):
        raise ValueError(
            f"the run's tokenizer is a tokenizer.json file ({tokenizer_id}); pass that file with --tokenizer"
        )
    return tokenizer_id


def from_swarm(
    initial_peers: list[str],
    run_id: str,
    *,
    tokenizer: str | None,
    model_name: str | None,
    timeout_s: float,
    swarm_key: str | None = None,
) -> Exportable:
    """The global parameters the majority of a live run's peers hold, in the run's model."""
    from peer.run_state import download_run_state, read_run_settings

    run_fingerprint, settings = read_run_settings(
        initial_peers, run_id, timeout_s=timeout_s, swarm_key=swarm_key
    )
    logger.info(f"run {run_id}: fingerprint {run_fingerprint}, model {settings.get('model')}")
    arch = settings.get("model") or {}
    spec = run_tokenizer(str(settings.get("tokenizer")), tokenizer)
    if model_name is not None:  # the run's own model config (a preset or a config file), not just its shapes
        model_config = load_model_config(
            model_name,
            vocab_size=arch.get("vocab_size", 0),
            max_seq_len=arch.get("max_position_embeddings", 0),
        )
        if architecture(model_config) != arch:
            raise ValueError(f"--model {model_name} is not the run's model ({arch})")
    else:
        model_config = config_from_architecture(arch)
    model = build_model(model_config, seed=0)
    logger.info("joining the run as a client to download its global parameters")
    state = download_run_state(
        initial_peers,
        run_id,
        settings=settings,
        run_fingerprint=run_fingerprint,
        params_like=list(model.parameters()),
        timeout_s=timeout_s,
        swarm_key=swarm_key,
    )
    load_global_params_(model, state.global_params, expected_sha256=state.params_sha256)
    logger.info(f"downloaded round {state.round}, global parameters {state.params_sha256[:10]}")
    provenance = {"round": state.round, "fingerprint": run_fingerprint, "params_sha256": state.params_sha256}
    provenance.update(run_id=run_id, source=f"swarm {' '.join(initial_peers)}")
    return Exportable(model, spec, int(arch.get("max_position_embeddings") or 0), provenance)


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


def write_model_dir(export: Exportable, out: Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write `out` (which must not exist or be empty) in one step: built in a temporary directory beside it."""
    from transformers import GenerationConfig

    model = export.model
    tokenizer = pretrained_tokenizer(export.tokenizer)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    model.config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if export.max_length:
            tokenizer.model_max_length = export.max_length  # what the run trained on
        tokenizer.save_pretrained(staging)
        if is_tokenizer_file(export.tokenizer):  # name the class older transformers versions know too
            config_path = staging / "tokenizer_config.json"
            tokenizer_config = json.loads(config_path.read_text())
            config_path.write_text(
                json.dumps({**tokenizer_config, "tokenizer_class": "PreTrainedTokenizerFast"})
            )
        GenerationConfig.from_model_config(model.config).save_pretrained(staging)
        provenance = {**export.provenance, "dtype": str(dtype).removeprefix("torch.")}
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
        description="Write a run's global parameters as a Hugging Face model directory, from a checkpoint or "
        "from a live swarm.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="a checkpoint file (round-N.safetensors) or a checkpoint directory (its newest usable checkpoint)",
    )
    source.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MADDR",
        help="multiaddrs of the live run's bootstrap node or any of its peers (with --run-id)",
    )
    parser.add_argument("--run-id", help="the live run to export (with --initial-peers)")
    parser.add_argument(
        "--swarm-key",
        metavar="@FILE",
        help="a private run's key, as its peers were given it (with --initial-peers)",
    )
    parser.add_argument(
        "--tokenizer", help="with --initial-peers: the run's tokenizer.json, if it is not the embedded one"
    )
    parser.add_argument(
        "--model",
        help="with --initial-peers: the run's --model (default: a config with the shapes the run publishes)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="with --initial-peers: give up after this long (default 120)",
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: --out {out} already exists and is not an empty directory", file=sys.stderr)
        return 2
    if args.initial_peers and not args.run_id:
        print("error: --initial-peers needs --run-id (the run to export)", file=sys.stderr)
        return 2
    if args.swarm_key is not None:
        from peer.swarm_key import read_swarm_key

        try:
            read_swarm_key(args.swarm_key)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.checkpoint and not Path(args.checkpoint).exists():
        print(f"error: --checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    if args.initial_peers:  # hivemind processes: as for a peer (peer/__main__.py)
        from peer.__main__ import die_with_parent

        os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
        die_with_parent()
    try:
        if args.checkpoint:
            export = from_checkpoint(*read_checkpoint(args.checkpoint))
        else:
            export = from_swarm(
                args.initial_peers,
                args.run_id,
                tokenizer=args.tokenizer,
                model_name=args.model,
                timeout_s=args.timeout_s,
                swarm_key=args.swarm_key,
            )
        write_model_dir(export, out, dtype=DTYPES[args.dtype])
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported round {export.provenance['round']} of {export.provenance['source']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
