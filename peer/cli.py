"""Flags and TOML config files -> RunConfig (shared by the peer CLI and the simulation)."""

from __future__ import annotations

import argparse

from peer.config import (
    COMPRESSIONS,
    DEVICES,
    DataConfig,
    InnerConfig,
    ModelConfig,
    OuterConfig,
    RunConfig,
    SwarmConfig,
    default_outer_momentum,
)

# flag name -> (config section, field name); section None means a RunConfig field
FLAGS: dict[str, tuple[str | None, str]] = {
    "initial_peers": ("swarm", "initial_peers"),
    "host_maddrs": ("swarm", "host_maddrs"),
    "announce_maddrs": ("swarm", "announce_maddrs"),
    "identity_path": ("swarm", "identity_path"),
    "maddrs_file": ("swarm", "maddrs_file"),
    "client_mode": ("swarm", "client_mode"),
    "run_id": ("swarm", "run_id"),
    "matchmaking_s": ("swarm", "matchmaking_s"),
    "straggler_wait_s": ("swarm", "straggler_wait_s"),
    "allreduce_timeout_s": ("swarm", "allreduce_timeout_s"),
    "chunk_timeout_s": ("swarm", "chunk_timeout_s"),
    "state_timeout_s": ("swarm", "state_timeout_s"),
    "wait_for_peers": ("swarm", "wait_for_peers"),
    "progress_period_s": ("swarm", "progress_period_s"),
    "model": ("model", "name"),
    "dataset": ("data", "dataset"),
    "tokenizer": ("data", "tokenizer"),
    "batch_size": ("data", "batch_size"),
    "seq_len": ("data", "seq_len"),
    "data_shard": ("data", "data_shard"),
    "eval_tokens": ("data", "eval_tokens"),
    "inner_steps": ("inner", "steps"),
    "inner_lr": ("inner", "lr"),
    "weight_decay": ("inner", "weight_decay"),
    "warmup_steps": ("inner", "warmup_steps"),
    "total_steps": ("inner", "total_steps"),
    "min_lr_ratio": ("inner", "min_lr_ratio"),
    "grad_clip": ("inner", "grad_clip"),
    "inner_optimizer": ("inner", "optimizer"),
    "round_tokens": ("inner", "round_tokens"),
    "outer_lr": ("outer", "lr"),
    "outer_momentum": ("outer", "momentum"),
    "compression": ("outer", "compression"),
    "overlap": ("outer", "overlap"),
    "seed": (None, "seed"),
    "max_rounds": (None, "max_rounds"),
    "device": (None, "device"),
    "num_threads": (None, "num_threads"),
    "metrics_file": (None, "metrics_file"),
    "eval_every": (None, "eval_every"),
    "eval_batches": (None, "eval_batches"),
    "checkpoint_dir": (None, "checkpoint_dir"),
    "checkpoint_every": (None, "checkpoint_every"),
    "keep_checkpoints": (None, "keep_checkpoints"),
    "resume": (None, "resume"),
    "test_fault": (None, "test_fault"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m peer",
        description="Join (or start) a DiLoCo training swarm. Every flag can also be set in --config FILE.toml "
        "(keys are flag names without dashes, e.g. inner_steps = 50); flags override the file.",
        argument_default=None,
    )
    p.add_argument("--config", help="TOML file with settings (flat keys named like the flags)")
    p.add_argument("--log-level", default="INFO", help="DEBUG shows every inner step (default INFO)")
    net = p.add_argument_group("swarm")
    net.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MADDR",
        help="multiaddrs of a bootstrap node or any live peer; tried in turn. "
        "None: start a new swarm and print this peer's multiaddrs",
    )
    net.add_argument(
        "--host-maddrs",
        nargs="+",
        metavar="MADDR",
        help="listen addresses (default /ip4/0.0.0.0/tcp/0: all interfaces, a random port)",
    )
    net.add_argument(
        "--announce-maddrs",
        nargs="+",
        metavar="MADDR",
        help="public addresses to advertise, e.g. /ip4/PUBLIC_IP/tcp/PORT",
    )
    net.add_argument(
        "--identity-path", help="private key file that keeps this peer's id stable across restarts"
    )
    net.add_argument(
        "--maddrs-file", help="write this peer's multiaddrs here once ready (others can join via them)"
    )
    net.add_argument(
        "--client-mode",
        action="store_const",
        const=True,
        help="behind NAT: make only outgoing connections (needs --initial-peers)",
    )
    net.add_argument("--run-id", help="name of the training run (default diloco)")
    net.add_argument("--matchmaking-s", type=float, help="minimum time to gather a round's group (default 5)")
    net.add_argument(
        "--straggler-wait-s",
        type=float,
        help="longest wait for slower peers of the same round; 0 (default) adapts it to the measured inner-phase time",
    )
    net.add_argument(
        "--allreduce-timeout-s", type=float, help="give up on an all-reduce after this long (default 120)"
    )
    net.add_argument(
        "--chunk-timeout-s",
        type=float,
        help="drop a peer that sends nothing for this long mid-transfer (default 10)",
    )
    net.add_argument(
        "--state-timeout-s", type=float, help="longest state download when joining (default 300)"
    )
    net.add_argument(
        "--wait-for-peers",
        type=int,
        metavar="N",
        help="when starting a fresh run, wait until N peers are live before round 1 (default 1)",
    )
    net.add_argument(
        "--progress-period-s",
        type=float,
        help="how often this peer publishes its progress to the DHT (default 2)",
    )
    mod = p.add_argument_group("model and data")
    mod.add_argument(
        "--model",
        help="preset (tiny, small, 10m, 60m, 150m, 400m, 1.1b) or a Hugging Face config.json (default tiny)",
    )
    mod.add_argument(
        "--dataset", help="'embedded' (default), a local .txt/.jsonl file, or a Hugging Face dataset name"
    )
    mod.add_argument(
        "--tokenizer", help="'embedded' (default), a tokenizer.json, or a Hugging Face tokenizer name"
    )
    mod.add_argument("--batch-size", type=int, help="sequences per inner step (default 8)")
    mod.add_argument("--seq-len", type=int, help="tokens per sequence (default 256)")
    mod.add_argument(
        "--data-shard",
        metavar="I/N",
        help="train on the i-th of n disjoint slices (default: whole corpus in a per-peer order)",
    )
    mod.add_argument("--eval-tokens", type=int, help="size of the held-out slice (default 65536)")
    inner = p.add_argument_group("inner optimizer (per peer)")
    inner.add_argument("--inner-steps", type=int, help="H, inner steps per round (default 500)")
    inner.add_argument("--inner-lr", type=float, help="peak AdamW learning rate (default 4e-4)")
    inner.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    inner.add_argument("--warmup-steps", type=int, help="linear warmup in global steps (default 1000)")
    inner.add_argument(
        "--total-steps", type=int, help="cosine horizon in global steps (default max_rounds x H)"
    )
    inner.add_argument(
        "--min-lr-ratio", type=float, help="cosine floor as a fraction of the peak (default 0.1)"
    )
    inner.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 disables (default 1.0)")
    inner.add_argument(
        "--inner-optimizer",
        choices=("adamw", "adamw8bit"),
        help="adamw (default) or bitsandbytes adamw8bit (CUDA)",
    )
    inner.add_argument(
        "--round-tokens",
        type=int,
        help="end a round when the swarm has processed this many tokens (fast peers do more steps); "
        "0 (default): H steps per peer",
    )
    outer = p.add_argument_group("outer optimizer (replicated on every peer)")
    outer.add_argument("--outer-lr", type=float, help="outer learning rate (default 0.7)")
    outer.add_argument(
        "--outer-momentum",
        type=float,
        help="Nesterov momentum (default 0.5 for the tiny, small and 10m presets, 0.9 otherwise)",
    )
    outer.add_argument("--compression", choices=COMPRESSIONS, help="pseudo-gradient encoding (default none)")
    outer.add_argument(
        "--overlap",
        action="store_const",
        const=True,
        help="all-reduce round r in the background while training round r+1 (hides communication)",
    )
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, help="initial model seed, must match across peers (default 0)")
    run.add_argument(
        "--max-rounds", type=int, help="stop after this many rounds; 0 runs until stopped (default 0)"
    )
    run.add_argument("--device", choices=DEVICES, help="auto (default: cuda if available), cpu or cuda")
    run.add_argument(
        "--num-threads",
        type=int,
        help="CPU threads for torch; 0 keeps torch's default. Use 1 for several peers on one machine",
    )
    run.add_argument("--metrics-file", help="append one JSON record per round to this file")
    run.add_argument(
        "--eval-every", type=int, help="held-out evaluation every N rounds, 0 disables (default 5)"
    )
    run.add_argument("--eval-batches", type=int, help="held-out batches per evaluation (default 8)")
    run.add_argument("--checkpoint-dir", help="save checkpoints here")
    run.add_argument("--checkpoint-every", type=int, help="checkpoint every N rounds (default 10)")
    run.add_argument("--keep-checkpoints", type=int, help="keep the newest N checkpoints (default 3)")
    run.add_argument("--resume", action="store_const", const=True, help="continue from the newest checkpoint")
    run.add_argument("--test-fault", help=argparse.SUPPRESS)  # fault injection for tests, see peer/faults.py
    return p


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(FLAGS))
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {', '.join(unknown)}")
    return values


def config_from_args(argv: list[str] | None = None) -> tuple[RunConfig, str]:
    args = build_parser().parse_args(argv)
    values = read_toml(args.config) if args.config else {}
    values.update({key: value for key, value in vars(args).items() if key in FLAGS and value is not None})
    sections: dict[str | None, dict] = {
        None: {},
        "model": {},
        "data": {},
        "inner": {},
        "outer": {},
        "swarm": {},
    }
    for key, value in values.items():
        section, field = FLAGS[key]
        if field in ("initial_peers", "host_maddrs", "announce_maddrs"):
            value = tuple([value] if isinstance(value, str) else value)
        sections[section][field] = value
    model = ModelConfig(**sections["model"])
    sections["outer"].setdefault("momentum", default_outer_momentum(model.name))
    config = RunConfig(
        model=model,
        data=DataConfig(**sections["data"]),
        inner=InnerConfig(**sections["inner"]),
        outer=OuterConfig(**sections["outer"]),
        swarm=SwarmConfig(**sections["swarm"]),
        **sections[None],
    )
    return config, args.log_level
