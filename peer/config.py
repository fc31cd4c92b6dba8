"""Every setting of a peer as frozen dataclasses, validated on construction, and the run fingerprint.

Each field is written once, here: its default, its docstring (the flag's help) and, through `setting()`,
what the command line needs beyond its name and type (peer.cli generates the flags and the TOML keys).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field

from peer.swarm_key import read_swarm_key

COMPRESSIONS = ("none", "fp16", "int8")
AGGREGATIONS = ("mean", "trimmed-mean")
COMPRESSION_CODECS = {"int8": "int8-absmax-1024"}
"""The wire format of a compression whose format changed since peers first shipped it (peer/codec.py INT8_CODEC_ID;
int8 used to be hivemind's bitsandbytes blockwise quantization). It is in the run fingerprint, so peers on the old
format and peers on this one never average together (I5), and the mismatch message names it."""
ALLREDUCE_PART_LAYOUT = "parts-4-per-reducer-16KiB-2MiB"
"""How the all-reduce cuts its tensors into parts (peer/allreduce.py allreduce_part_bytes): every member of a group
must cut alike, or the parts a reducer receives have shapes it does not expect. It is in the run fingerprint, so peers
of a version that cuts otherwise (hivemind's fixed 512 KiB before) never average with this one."""
RECORD_SIGNATURES = "ed25519"
"""How peers sign their DHT records (peer/signing.py; hivemind's RSA keys before): peers that sign otherwise cannot read
each other's round records, so this is in the run fingerprint too, and the mismatch message names it."""
DIRECT_TRANSPORTS = ("on", "off")
INNER_OPTIMIZERS = ("adamw", "adamw8bit")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# tokens in one inner step (batch x sequence length): bounds the averaging weight a peer may claim
MAX_STEP_TOKENS = 2**24


def setting(
    default,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices=None,
    parse=None,
    hidden: bool = False,
    cli: bool = True,
    secret: bool = False,
):
    """A field with command-line details: `flag` (name without dashes, default: the field's name; also the
    TOML key), `metavar`, `choices`, `parse` (text -> value, for values given as one string), `hidden` (kept
    out of --help), `cli` (False: no flag, set by the program), `secret` (kept out of repr() and of what
    RunConfig.to_dict() saves with checkpoints)."""
    metadata = {"flag": flag, "metavar": metavar, "choices": choices, "parse": parse, "hidden": hidden}
    metadata = {key: value for key, value in metadata.items() if value}
    if not cli:
        metadata["cli"] = False
    if secret:
        metadata["secret"] = True
    return field(default=default, metadata=metadata, repr=not secret)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, whitespace collapsed (the flags' help)."""
    return _class_field_docs(inspect.getsourcefile(cls)).get(cls.__qualname__, {})


@functools.cache
def _class_field_docs(path: str) -> dict[str, dict[str, str]]:
    """Class name -> field -> docstring, for the top-level classes of a source file (parsed once)."""
    with open(path, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    docs: dict[str, dict[str, str]] = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        fields = docs.setdefault(cls.name, {})
        for node, after in zip(cls.body, cls.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                fields[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which causal language model the swarm trains."""

    name: str | None = setting(None, flag="model")
    """A preset (tiny, small, 10m, 60m, 150m, 400m, 1.1b), a Hugging Face config.json or model directory, or a
    model id in the local Hugging Face cache: the architecture (the weights come from --init-from).
    Default: the --init-from model, else tiny."""
    init_from: str | None = setting(None, metavar="DIR")
    """Start from the pretrained weights in this save_pretrained directory (or cached Hugging Face model id),
    e.g. a model exported from a run; its architecture is the model's. The weights are part of the run's
    fingerprint: every peer of the run starts from the same ones."""

    def __post_init__(self) -> None:
        if self.name is None:
            object.__setattr__(self, "name", self.init_from or DEFAULT_MODEL)
        elif self.init_from and not _same_model(self.name, self.init_from):
            raise ValueError(
                f"--model {self.name} and --init-from {self.init_from} differ: the model's architecture is "
                "the one in --init-from (leave out --model)"
            )
        if not self.name:
            raise ValueError("--model must be a preset, a config file, a model directory or a model id")


DEFAULT_MODEL = "tiny"


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from and how they are cut into batches."""

    dataset: str = "embedded"
    """'embedded' (the corpus shipped with the package), a Hugging Face dataset name (streamed), a directory
    written by datasets' save_to_disk, or local .txt/.jsonl/.parquet/.csv files."""
    dataset_config: str | None = None
    """The Hugging Face dataset's configuration (e.g. en for allenai/c4)."""
    split: str = "train"
    """The split to train on."""
    text_field: str = "text"
    """The field of each record that holds its text."""
    eval_split: str | None = None
    """A split to take the held-out slice from (default: the end of the training split, never trained on)."""
    tokenizer: str = "embedded"
    """'embedded' (the BPE tokenizer shipped with the package), a tokenizer.json, or a Hugging Face tokenizer
    name."""
    batch_size: int = 8
    """Sequences per inner step (the same on every peer of a run; --micro-batch-size fits it in memory)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass: a step accumulates the gradients of batch_size / micro_batch_size
    micro-batches, to fit a large batch in memory (0: the whole batch at once). A local choice: the step is
    the same up to float rounding."""
    seq_len: int = 256
    """Tokens per sequence."""
    data_shard: str | None = setting(None, metavar="I/N")
    """Train only on the i-th of n disjoint slices (experiments). Default: the whole corpus, in an order
    derived from the peer id."""
    eval_tokens: int = 65536
    """Size of the held-out slice (taken from the end of the corpus, never trained on)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise ValueError(
                f"--micro-batch-size must divide --batch-size {self.batch_size}, got {self.micro_batch_size}"
            )
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.batch_size * self.seq_len > MAX_STEP_TOKENS:
            raise ValueError(
                f"--batch-size x --seq-len must be at most {MAX_STEP_TOKENS} tokens per step (the most a peer's "
                f"averaging weight may claim), got {self.batch_size} x {self.seq_len}"
            )
        if self.eval_tokens < 0:
            raise ValueError(f"--eval-tokens must be non-negative, got {self.eval_tokens}")
        if self.data_shard is not None:
            parse_shard(self.data_shard)

    @property
    def shard(self) -> tuple[int, int] | None:
        return None if self.data_shard is None else parse_shard(self.data_shard)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--data-shard must look like i/n (for example 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--data-shard {text!r}: need 0 <= i < n")
    return index, count


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    """The local optimizer each peer runs for H steps per round (paper defaults)."""

    steps: int = setting(500, flag="inner_steps")
    """H: inner steps per round."""
    lr: float = setting(4e-4, flag="inner_lr")
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    warmup_steps: int = 1000
    """Linear warmup length in global steps (round x H + inner step)."""
    total_steps: int = 0
    """Cosine decay horizon in global steps; 0 means max_rounds x H (constant after warmup if that is 0 too)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to this fraction of the peak learning rate."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    optimizer: str = setting("adamw", flag="inner_optimizer", choices=INNER_OPTIMIZERS)
    """adamw (torch) or adamw8bit (bitsandbytes, CUDA only)."""
    round_tokens: int = setting(0, metavar="N")
    """Heterogeneous rounds: a round ends once the whole swarm has processed N tokens since the last sync, so
    fast peers do more inner steps and slow peers fewer. 0: every peer does H steps. H still sets the
    learning-rate schedule's steps per round."""

    def __post_init__(self) -> None:
        if self.round_tokens < 0:
            raise ValueError(f"--round-tokens must be non-negative, got {self.round_tokens}")
        if self.steps < 1:
            raise ValueError(f"--inner-steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"--inner-lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be non-negative, got {self.warmup_steps}")
        if self.total_steps < 0:
            raise ValueError(f"--total-steps must be non-negative, got {self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be non-negative, got {self.grad_clip}")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"--inner-optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got {self.optimizer!r}"
            )


# The outer momentum default per model preset. The paper's 0.9 was tuned for 60M-400M models with 100+ outer
# steps; on the CPU presets, trained from scratch for tens of rounds, the sweep in docs/RESULTS.md found 0.5
# better (tiny, k=4, H=50: 5.585 against 5.675 held-out loss). Larger presets keep the paper's value.
CPU_PRESETS_OUTER_MOMENTUM = {"tiny": 0.5, "small": 0.5, "10m": 0.5}
PAPER_OUTER_MOMENTUM = 0.9


def default_outer_momentum(model_name: str) -> float:
    return CPU_PRESETS_OUTER_MOMENTUM.get(model_name, PAPER_OUTER_MOMENTUM)


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """How peers combine their work at the end of a round."""

    lr: float = setting(0.7, flag="outer_lr")
    """Outer learning rate applied to the averaged pseudo-gradient."""
    momentum: float | None = setting(None, flag="outer_momentum")
    """Nesterov momentum; 0 turns the outer step into plain averaging (with lr 1). Default: 0.5 for the tiny,
    small and 10m presets, the paper's 0.9 otherwise (measured, see docs/RESULTS.md)."""
    # None until RunConfig resolves it from the model preset (default_outer_momentum)
    compression: str = setting("none", choices=COMPRESSIONS)
    """Pseudo-gradient encoding on the wire: none, fp16 or int8 (blockwise absmax 8-bit, peer/codec.py)."""
    aggregation: str = setting("mean", choices=AGGREGATIONS)
    """How a group combines its pseudo-gradients: mean (the paper's weighted mean) or trimmed-mean (per value, the
    highest and the lowest contribution of a group of three or more are left out: for open swarms, where one peer
    may lie; see README Security)."""
    overlap: bool = False
    """All-reduce round r in the background while round r+1's inner steps run (hides communication). A local
    choice, not part of the fingerprint: peers with and without it can train together."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"--outer-lr must be positive, got {self.lr}")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--outer-momentum must be in [0, 1), got {self.momentum}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )


@dataclass(frozen=True, kw_only=True)
class SwarmConfig:
    """How this peer finds and talks to the others."""

    initial_peers: tuple[str, ...] = setting((), metavar="MADDR")
    """Multiaddrs of a bootstrap node or any live peer, tried in turn. None: start a new swarm and print this
    peer's multiaddrs."""
    host_maddrs: tuple[str, ...] = setting(("/ip4/0.0.0.0/tcp/0",), metavar="MADDR")
    """Addresses to listen on; the default listens on all interfaces at a random port."""
    announce_maddrs: tuple[str, ...] = setting((), metavar="MADDR")
    """Public addresses to advertise, e.g. /ip4/PUBLIC_IP/tcp/PORT (behind port forwarding, on cloud
    machines)."""
    identity_path: str | None = None
    """Private key file that keeps this peer's id and multiaddrs stable across restarts."""
    maddrs_file: str | None = None
    """Write this peer's multiaddrs here once it is ready (others can join through them)."""
    client_mode: bool = False
    """Behind NAT: make only outgoing connections (needs --initial-peers); still contributes to averaging."""
    direct_transport: str = setting("on", choices=DIRECT_TRANSPORTS)
    """on: the all-reduce's data goes over direct TCP connections between peers (authenticated, not encrypted),
    falling back to the p2p daemon per peer where one cannot connect; off: everything through the p2p daemon."""
    direct_port: int = setting(0, metavar="PORT")
    """TCP port of the direct data path (0: chosen by the OS); others reach it at this peer's announced address
    (--announce-maddrs) or, without one, its listening addresses."""
    run_id: str = "diloco"
    """Name of the training run; peers only average with peers of the same run and fingerprint."""
    matchmaking_s: float = 5.0
    """Minimum time to gather a group for a round's all-reduce."""
    straggler_wait_s: float = 0.0
    """Longest wait for slower peers of the same round before averaging without them; 0 adapts it to the
    measured round time (the median of this peer's recent inner phases, at least 10 s)."""
    allreduce_timeout_s: float = 120.0
    """Give up on an all-reduce that has not finished after this long."""
    chunk_timeout_s: float = 10.0
    """Drop a peer that sends no data for this long during an all-reduce or a state download."""
    state_timeout_s: float = 300.0
    """Longest time to download the swarm's state when joining or resyncing. It also sets the slowest donor
    accepted: one that sends less than the state's size / this per second is dropped for the next donor, so raise it
    on a slow link (a 600 MB state in 300 s needs 2 MB/s)."""
    progress_period_s: float = 2.0
    """How often this peer publishes its progress record to the DHT."""
    wait_for_peers: int = setting(1, metavar="N")
    """When starting a fresh run, wait (up to --state-timeout-s) until N peers are live before round 1."""
    swarm_key: str | None = setting(None, metavar="@FILE", secret=True)
    """Private swarm: only peers given the same key can read or write the run's records, join its groups or
    download its state. @FILE reads the key from a file (recommended: other users of a machine can see command
    lines); any other text is the key itself. At least 16 bytes, e.g. from openssl rand -hex 32. The bootstrap
    node does not need it."""

    def __post_init__(self) -> None:
        if not self.run_id or any(ch in self.run_id for ch in ". \t\n"):
            raise ValueError(f"--run-id must be non-empty without dots or spaces, got {self.run_id!r}")
        for name in (
            "matchmaking_s",
            "allreduce_timeout_s",
            "chunk_timeout_s",
            "state_timeout_s",
            "progress_period_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.straggler_wait_s < 0:
            raise ValueError(f"--straggler-wait-s must be non-negative, got {self.straggler_wait_s}")
        if self.wait_for_peers < 1:
            raise ValueError(f"--wait-for-peers must be at least 1, got {self.wait_for_peers}")
        if self.direct_transport not in DIRECT_TRANSPORTS:
            raise ValueError(f"--direct-transport must be on or off, got {self.direct_transport!r}")
        if not 0 <= self.direct_port <= 65535:
            raise ValueError(f"--direct-port must be in [0, 65535], got {self.direct_port}")
        if self.client_mode and not self.initial_peers:
            raise ValueError("--client-mode needs --initial-peers: a client cannot start a swarm")
        if self.swarm_key is not None:
            read_swarm_key(
                self.swarm_key
            )  # a missing, unreadable or too short key fails here, before any work


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a peer needs to train; saved with every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    seed: int = 0
    """Seed of the initial model (must match across peers) and base of the data order."""
    max_rounds: int = 0
    """Stop after this many rounds (0: run until stopped)."""
    device: str = "auto"
    """auto (the first CUDA device if there is one), cpu, cuda or cuda:N."""
    precision: str = setting("auto", choices=PRECISIONS)
    """Inner steps in fp32, or with bf16 autocast over fp32 weights; auto: bf16 on CUDA, fp32 on the CPU. TF32
    matmuls are on for CUDA. A local choice: the global parameters stay fp32 and identical on every peer."""
    num_threads: int = 0
    """CPU threads for torch (0: torch's default). Use 1 when several peers share one machine."""
    metrics_file: str | None = None
    """Append one JSON record per round to this file."""
    wandb_project: str | None = None
    """Also log this peer's per-round metrics to this Weights & Biases project (pip install 'diloco-swarm[wandb]';
    WANDB_MODE=offline writes to disk)."""
    eval_every: int = 5
    """Evaluate the held-out loss every this many rounds (0 disables)."""
    eval_batches: int = 8
    """Batches of the held-out slice per evaluation."""
    checkpoint_dir: str | None = None
    """Save checkpoints here."""
    checkpoint_every: int = 10
    """Checkpoint every this many rounds (and on shutdown)."""
    keep_checkpoints: int = 3
    """Keep only the newest few checkpoints."""
    resume: bool = False
    """Continue from the newest checkpoint in --checkpoint-dir."""
    log_level: str = "INFO"
    """DEBUG (every inner step), INFO (once per round), WARNING or ERROR."""
    test_fault: str | None = setting(None, hidden=True)
    """Test-only fault injection (see peer/faults.py)."""

    def __post_init__(self) -> None:
        if self.outer.momentum is None:  # the one place where the preset's outer momentum is chosen
            momentum = default_outer_momentum(self.model.name)
            object.__setattr__(self, "outer", dataclasses.replace(self.outer, momentum=momentum))
        if self.max_rounds < 0:
            raise ValueError(f"--max-rounds must be non-negative, got {self.max_rounds}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.inner.optimizer == "adamw8bit" and self.device == "cpu":
            raise ValueError(
                "--inner-optimizer adamw8bit needs a CUDA device (bitsandbytes); use adamw on the CPU"
            )
        if self.num_threads < 0:
            raise ValueError(f"--num-threads must be non-negative, got {self.num_threads}")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError("--eval-every must be >= 0 and --eval-batches >= 1")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("--checkpoint-every and --keep-checkpoints must be at least 1")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        object.__setattr__(self, "log_level", self.log_level.upper())

    @property
    def total_inner_steps(self) -> int:
        """Horizon of the cosine schedule."""
        return self.inner.total_steps or self.max_rounds * self.inner.steps

    def to_dict(self) -> dict:
        """The settings as saved with checkpoints and sent to wandb; a secret (a swarm key given as the key itself,
        not as @FILE) is replaced by a placeholder that no key check accepts."""
        values = dataclasses.asdict(self)
        _redact_secrets(self, values)
        return values


SECRET_PLACEHOLDER = "<not saved>"


def _redact_secrets(settings, values: dict) -> None:
    """Replace, in dataclasses.asdict(settings), every secret given as itself by SECRET_PLACEHOLDER."""
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            _redact_secrets(value, values[item.name])
        elif item.metadata.get("secret") and isinstance(value, str) and not value.startswith("@"):
            values[item.name] = SECRET_PLACEHOLDER


# ---- run settings and machine settings ---------------------------------------------------------------------------
# Every flag (by its name) is in exactly one of the three sets below: a new setting must be placed deliberately
# (tests/unit/test_run_settings.py). The peer that starts a run publishes its run settings (SHARED_SETTINGS and
# RUN_DEFAULTS) in the DHT, and a volunteer adopts each one it does not give itself (peer/run_settings.py).

SHARED_SETTINGS = frozenset(
    {
        "run_id",
        "model",
        "init_from",
        "tokenizer",
        "seed",
        "batch_size",
        "seq_len",
        "inner_steps",
        "inner_lr",
        "weight_decay",
        "warmup_steps",
        "total_steps",
        "min_lr_ratio",
        "grad_clip",
        "round_tokens",
        "outer_lr",
        "outer_momentum",
        "compression",
        "aggregation",
    }
)
"""The settings that change the math every peer must compute alike: the initial model (architecture, seed or
pretrained weights), the tokens (tokenizer, sequence length, sequences per step), the inner optimizer and its
learning-rate schedule (a peer on another schedule pulls the average elsewhere), how a round ends and the outer
step. All of them are in the run fingerprint (fingerprint_settings), so peers that differ never average together,
and a volunteer's flag that contradicts the run is an error. model, init_from and tokenizer enter the fingerprint
by content (architecture, weights hash, tokenizer id), so a volunteer may name its own copy at another path."""

RUN_DEFAULTS = frozenset(
    {
        "dataset",
        "dataset_config",
        "split",
        "text_field",
        "eval_split",
        "eval_tokens",
        "eval_batches",
        "max_rounds",
    }
)
"""The run's choices that are not shared math: adopted by a volunteer that does not give them, but a volunteer may
choose its own. Which documents a peer reads differs from peer to peer anyway (each reads the data in its own
order), so a volunteer may read its own copy of the run's data at another path; the held-out set is the same on
every peer so that held-out losses compare; max_rounds is how many rounds this peer trains (the run's schedule
horizon, which it also sets when total_steps is 0, is published as total_steps and is shared)."""

MACHINE_SETTINGS = frozenset(
    {
        # how this machine computes the same step: memory and speed, not the math (fp32 master weights and the
        # global parameters are identical on every peer; 8-bit AdamW needs CUDA, so a run cannot impose it)
        "device",
        "precision",
        "micro_batch_size",
        "inner_optimizer",
        "num_threads",
        "overlap",
        # where this peer listens, how it is reached and how patiently it waits (timing, not math)
        "initial_peers",
        "host_maddrs",
        "announce_maddrs",
        "identity_path",
        "maddrs_file",
        "client_mode",
        "direct_transport",
        "direct_port",
        "matchmaking_s",
        "straggler_wait_s",
        "allreduce_timeout_s",
        "chunk_timeout_s",
        "state_timeout_s",
        "progress_period_s",
        "wait_for_peers",
        "swarm_key",  # a secret: never published in the run's settings; every peer of a private run is given it
        # this peer's files, logs and experiments
        "data_shard",
        "metrics_file",
        "wandb_project",
        "eval_every",
        "checkpoint_dir",
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
        "log_level",
        "test_fault",
    }
)
"""This machine's own: never published, never adopted."""

CONTENT_SETTINGS = frozenset({"model", "init_from", "tokenizer"})
"""Shared settings that name a file or a Hugging Face id: the fingerprint holds what they contain."""


def schedule_horizon(config: RunConfig) -> int:
    """The global step at which the cosine decay ends, as the schedule uses it (--total-steps, or max_rounds x H
    when that is 0); 0 when the learning rate stays constant after warmup (no horizon, or one within the warmup)."""
    horizon = config.total_inner_steps
    return horizon if horizon > config.inner.warmup_steps else 0


def shared_values(config: RunConfig) -> dict:
    """The shared settings read off the config itself (all but CONTENT_SETTINGS), by flag name. total_steps is the
    schedule's horizon (schedule_horizon), so two configs that give the same learning rates agree on it."""
    inner, data, outer = config.inner, config.data, config.outer
    return {
        "run_id": config.swarm.run_id,
        "seed": config.seed,
        "batch_size": data.batch_size,
        "seq_len": data.seq_len,
        "inner_steps": inner.steps,
        "inner_lr": inner.lr,
        "weight_decay": inner.weight_decay,
        "warmup_steps": inner.warmup_steps,
        "total_steps": schedule_horizon(config),
        "min_lr_ratio": inner.min_lr_ratio,
        "grad_clip": inner.grad_clip,
        "round_tokens": inner.round_tokens,
        "outer_lr": outer.lr,
        "outer_momentum": outer.momentum,
        "compression": outer.compression,
        "aggregation": outer.aggregation,
    }


def fingerprint_settings(
    config: RunConfig, *, model_arch: dict, tokenizer_id: str, init_params_sha256: str | None = None
) -> dict:
    """The settings that must match for peers to average together (I5): every shared setting, the model, the
    tokenizer and the initial weights by content, and the compression's wire format where it changed
    (COMPRESSION_CODECS), how the all-reduce cuts parts (ALLREDUCE_PART_LAYOUT) and how records are signed
    (RECORD_SIGNATURES). `init_params_sha256`: the hash of the pretrained initial parameters (--init-from), which
    replace the seed's."""
    init = {} if init_params_sha256 is None else {"init_params_sha256": init_params_sha256}
    codec = COMPRESSION_CODECS.get(config.outer.compression)
    codecs = {} if codec is None else {"compression_codec": codec}
    return {
        **init,
        **codecs,
        "allreduce_parts": ALLREDUCE_PART_LAYOUT,
        "record_signatures": RECORD_SIGNATURES,
        "model": model_arch,
        "tokenizer": tokenizer_id,
        **shared_values(config),
    }


def fingerprint(settings: dict) -> str:
    """Short stable hash of fingerprint_settings()."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def differing_settings(ours: dict, theirs: dict) -> list[str]:
    """Names of the fingerprint settings where two peers differ, for a clear error message."""
    keys = sorted(set(ours) | set(theirs))
    return [
        f"{key} (ours {ours.get(key)!r}, theirs {theirs.get(key)!r})"
        for key in keys
        if ours.get(key) != theirs.get(key)
    ]
