"""k DiLoCo replicas in one process, averaged exactly in memory: the project's one reference loop.

With contiguous shards, replica i trains like a networked peer started with `--data-shard i/k` (the same inner
steps, canonical-order average and outer step), so both give the same global parameters round after round
(fp32, no compression). ExperimentConfig adds the ablation knobs of docs/RESULTS.md on top of a RunConfig.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from peer.codec import fp16_decode, fp16_encode, int8_decode, int8_encode
from peer.config import COMPRESSIONS, OuterConfig, RunConfig, setting
from peer.data import data_seed, train_batches
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step, inner_step_options
from peer.outer import AveragingResult, OuterOptimizer
from peer.robust import AGGREGATORS
from peer.workload import Workload

CPU = torch.device("cpu")  # the simulation runs on the CPU
MODES = ("diloco", "data-parallel", "single")
SHARDS = ("contiguous", "iid")
OUTER_OPTIMIZERS = ("nesterov", "adam")


def parse_pool(text: str) -> tuple[tuple[int, int], ...]:
    """'2:5,4:5' -> ((2, 5), (4, 5)): 2 replicas for 5 rounds, then 4 for 5 rounds."""
    try:
        return tuple((int(k), int(r)) for k, r in (phase.split(":") for phase in text.split(",")))
    except ValueError:
        raise ValueError(f"--pool must look like K:ROUNDS[,K:ROUNDS...], got {text!r}") from None


def parse_speeds(text: str) -> tuple[float, ...]:
    """'1,1,0.5' -> (1.0, 1.0, 0.5)."""
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--speeds must be comma-separated numbers, got {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """What to run on top of a RunConfig (which gives the model, data, H, rounds and optimizers)."""

    mode: str = "diloco"
    """diloco (k replicas, H inner steps per round), data-parallel (one model, k x batch, a step is a sync),
    or single (one model, the per-peer batch, the same number of steps as one replica); on the command line,
    compare runs all three with the same settings."""
    replicas: int = setting(2, metavar="K")
    """k: simulated peers (DiLoCo) or the batch multiplier (data-parallel)."""
    shards: str = "contiguous"
    """contiguous: replica i trains on the i-th contiguous slice (= `--data-shard i/k`; the corpus is ordered
    by work, so this is non-i.i.d.); iid: every replica samples the whole corpus in its own order."""
    outer_optimizer: str = "nesterov"
    """nesterov (the project's OuterOptimizer, SGD with Nesterov momentum: --outer-lr, --outer-momentum) or
    adam (simulation only, lr = --outer-lr)."""
    pool: tuple[tuple[int, int], ...] = setting((), metavar="K:R[,K:R...]", parse=parse_pool)
    """Changing compute pool: K replicas for R rounds, then ...; replaces --replicas x --max-rounds."""
    drop_prob: float = setting(0.0, metavar="P")
    """Probability that a replica's pseudo-gradient is lost in a round (it then restarts from the new θ)."""
    warm_start_steps: int = setting(0, metavar="N")
    """Data-parallel steps (k x batch) before DiLoCo starts, counted in the same token budget and schedule."""
    speeds: tuple[float, ...] = setting((), metavar="S1,S2,...", parse=parse_speeds)
    """Simulated relative speed of each replica (inner steps per time unit, for idle time); default all 1."""
    round_tokens: int = setting(0, metavar="N")
    """Heterogeneous rounds (simulated): a round ends once the swarm has processed N tokens; fast replicas do
    more inner steps. 0: fixed H per replica."""
    eval_every_steps: int = setting(100, metavar="N")
    """Evaluate whenever the per-replica step count crosses a multiple of N (and at the end)."""
    eval_windows: int = setting(128, metavar="N")
    """Held-out windows of --seq-len tokens per evaluation (the same windows in every mode)."""
    seed_drop: int = setting(0, cli=False)
    """Seed of the dropped-update draws."""
    compression: str = setting("none", cli=False)
    """Pseudo-gradient encoding as in the networked all-reduce (none, fp16, int8; the peer's --compression
    flag): each replica's pseudo-gradient is encoded and decoded, the decoded parts are averaged, and the
    average is encoded and decoded once more; every replica uses those decoded values."""
    overlap_delay_steps: int = setting(-1, metavar="D")
    """Overlapped outer step: round r's average is applied after the replicas already did D inner steps of
    round r+1 (it arrived in the background); each replica then keeps the progress it made since its
    end-of-round snapshot (`OuterOptimizer.rebase_`). 0 gives exactly the non-overlapped run; -1: off."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.shards not in SHARDS:
            raise ValueError(f"--shards must be one of {', '.join(SHARDS)}, got {self.shards!r}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"--outer-optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}")
        if any(k < 1 or r < 1 for k, r in self.pool):
            raise ValueError("--pool phases need at least 1 replica and 1 round each, e.g. 2:5,4:5")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"--drop-prob must be in [0, 1), got {self.drop_prob}")
        if self.warm_start_steps < 0 or self.round_tokens < 0:
            raise ValueError("--warm-start-steps and --round-tokens must be non-negative")
        if self.speeds and (len(self.speeds) != self.max_replicas or min(self.speeds) <= 0):
            raise ValueError(f"--speeds needs {self.max_replicas} positive values, one per replica")
        if self.eval_every_steps < 1 or self.eval_windows < 1:
            raise ValueError("--eval-every-steps and --eval-windows must be at least 1")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.overlap_delay_steps < -1:
            raise ValueError(
                f"--overlap-delay-steps must be -1 (off) or at least 0, got {self.overlap_delay_steps}"
            )

    @property
    def max_replicas(self) -> int:
        return max(k for k, _ in self.pool) if self.pool else self.replicas


# ---- averaging in memory ------------------------------------------------------------------------------------
class InMemoryAverager:
    """The exact averager: the same canonical-order combination (--aggregation) the networked reducers compute."""

    def __init__(self, aggregation: str = "mean"):
        self.combine = AGGREGATORS[aggregation]

    def average_round(
        self, pseudo_grads: list[list[torch.Tensor]], *, tokens: list[int], order_keys: list[bytes]
    ) -> AveragingResult:
        averaged = [
            self.combine([grads[j] for grads in pseudo_grads], tokens, order_keys)
            for j in range(len(pseudo_grads[0]))
        ]
        return AveragingResult(averaged=averaged, group_size=len(pseudo_grads), tokens=sum(tokens))


def encode_decode(tensor: torch.Tensor, compression: str) -> torch.Tensor:
    """What a receiver decodes from `tensor` sent with the swarm's pseudo-gradient compression (fp32 out).

    The networked all-reduce encodes the parts it splits each tensor into; those parts are whole int8 blocks
    (peer/compression.py Int8Compression), so encoding the whole tensor here gives the same blocks and values."""
    if compression == "none":
        return tensor
    if compression == "fp16":
        return fp16_decode(fp16_encode(tensor).numpy().tobytes(), tensor.numel()).reshape(tensor.shape)
    return int8_decode(int8_encode(tensor).numpy().tobytes(), tensor.numel()).reshape(tensor.shape)


def compressed_average(
    pseudo_grads: list[list[torch.Tensor]],
    *,
    tokens: list[int],
    order_keys: list[bytes],
    compression: str,
    aggregation: str = "mean",
) -> AveragingResult:
    """The networked all-reduce's values under compression: senders encode their parts, the reducer averages
    the decoded parts and encodes the average once, and every peer (the reducer too) uses its decoding."""
    averager = InMemoryAverager(aggregation)
    if compression == "none":
        return averager.average_round(pseudo_grads, tokens=tokens, order_keys=order_keys)
    sent = [[encode_decode(g, compression) for g in grads] for grads in pseudo_grads]
    result = averager.average_round(sent, tokens=tokens, order_keys=order_keys)
    result.averaged = [encode_decode(a, compression) for a in result.averaged]
    return result


class AdamOuter(OuterOptimizer):
    """Adam on the averaged pseudo-gradient (the paper's Adam ablation); same interface, simulation only."""

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, params: Sequence[torch.Tensor], config: OuterConfig):
        super().__init__(params, config)
        self.second_moment = [torch.zeros_like(p) for p in self.global_params]
        self.num_steps = 0

    @torch.no_grad()
    def step_(self, averaged_pseudo_grads: Sequence[torch.Tensor]) -> None:
        self.num_steps += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1**self.num_steps, 1 - beta2**self.num_steps
        for theta, m, v, grad in zip(
            self.global_params, self.momentum, self.second_moment, averaged_pseudo_grads, strict=True
        ):
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            theta.sub_((m / bias1) / ((v / bias2).sqrt() + self.eps) * self.config.lr)


# ---- replicas ---------------------------------------------------------------------------------------------
@dataclass
class Replica:
    """One simulated peer: its local model, inner optimizer, data stream and order key."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[torch.Tensor]
    order_key: bytes
    speed: float = 1.0


def make_replicas(config: RunConfig, exp: ExperimentConfig, workload: Workload) -> list[Replica]:
    k = exp.max_replicas
    replicas = []
    for i in range(k):
        # contiguous: replica i is a networked peer started with --data-shard i/k
        stream_id = f"{i}/{k}" if exp.shards == "contiguous" else f"iid:{i}"
        seed = data_seed(config.seed, stream_id)
        model = copy.deepcopy(workload.model)
        batches = train_batches(
            workload.corpus.train,
            batch_size=config.data.batch_size,
            seq_len=config.data.seq_len,
            seed=seed,
            shard=(i, k) if exp.shards == "contiguous" else None,
        )
        speed = exp.speeds[i] if exp.speeds else 1.0
        optimizer = build_inner_optimizer(model, config.inner)
        replicas.append(Replica(model, optimizer, batches, seed.to_bytes(8, "big"), speed))
    return replicas


def round_steps(replicas: list[Replica], *, H: int, round_tokens: int, tokens_per_step: int) -> list[int]:
    """Inner steps of each active replica this round; with round_tokens, the first replicas to finish a step
    (in simulated time) take the swarm's budget, so a replica twice as fast does twice the steps."""
    if not round_tokens:
        return [H] * len(replicas)
    steps = [0] * len(replicas)
    for _ in range(math.ceil(round_tokens / tokens_per_step)):
        i = min(range(len(replicas)), key=lambda j: ((steps[j] + 1) / replicas[j].speed, j))
        steps[i] += 1
    return steps


def train_inner_steps_(
    replica: Replica, *, config: RunConfig, first_global_step: int, num_steps: int, total_steps: int
) -> list[float]:
    """num_steps inner steps of one replica on the swarm's schedule (global step = round x H + step)."""
    losses = []
    for step in range(num_steps):
        lr = inner_lr(first_global_step + step, config=config.inner, total_steps=total_steps)
        batch = next(replica.batches)
        losses.append(
            inner_step(replica.model, replica.optimizer, batch, lr=lr, **inner_step_options(config, CPU))
        )
    return losses


def warm_start_(
    config: RunConfig, exp: ExperimentConfig, workload: Workload, replicas: list[Replica]
) -> dict:
    """The paper's warm start: train one model data-parallel first, then every replica starts from it."""
    model = copy.deepcopy(workload.model)
    optimizer = build_inner_optimizer(model, config.inner)
    batches = train_batches(
        workload.corpus.train,
        batch_size=config.data.batch_size * exp.replicas,
        seq_len=config.data.seq_len,
        seed=data_seed(config.seed, "warm-start"),
    )
    total = exp.warm_start_steps + config.total_inner_steps
    for step in range(exp.warm_start_steps):
        lr = inner_lr(step, config=config.inner, total_steps=total)
        inner_step(model, optimizer, next(batches), lr=lr, **inner_step_options(config, CPU))
    for replica in replicas:  # each replica gets the warm model and a copy of its AdamW state
        replica.model.load_state_dict(model.state_dict())
        replica.optimizer.load_state_dict(optimizer.state_dict())
    return {
        "step": exp.warm_start_steps,
        "tokens": exp.warm_start_steps * config.data.batch_size * exp.replicas * config.data.seq_len,
        "eval_loss": evaluate(model, workload.held_out, CPU),
    }


# ---- the loop -----------------------------------------------------------------------------------------------
@dataclass
class ReplicaRun:
    """What run_replicas produced."""

    outer: OuterOptimizer
    rounds: list[dict] = field(default_factory=list)
    """One record per round: round, loss, group_size, inner_steps (per replica), tokens, global_params_sha256,
    and eval_loss where evaluated."""
    curve: list[dict] = field(default_factory=list)
    """Held-out loss points: step (per replica), tokens, eval_loss, sim_time (after a warm start: its point)."""
    sim_time: float = 0.0
    idle_time: float = 0.0
    num_dropped: int = 0


def crosses_eval_step(exp: ExperimentConfig, H: int, num_rounds: int) -> Callable[[int, int], bool]:
    """The experiments' evaluation rule: whenever a replica's step count crosses a multiple of
    eval_every_steps, and after the last round."""

    def should_evaluate(round_index: int, per_replica_step: int) -> bool:
        crossed = per_replica_step // exp.eval_every_steps > (per_replica_step - H) // exp.eval_every_steps
        return crossed or round_index + 1 == num_rounds

    return should_evaluate


def run_replicas(
    config: RunConfig,
    exp: ExperimentConfig,
    workload: Workload,
    *,
    should_evaluate: Callable[[int, int], bool] | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_eval: Callable[[dict], None] | None = None,
) -> ReplicaRun:
    """DiLoCo with the project's inner step, exact averaging and outer step, plus the ablation knobs.

    `should_evaluate(round_index, per_replica_step)` says after which rounds to measure the held-out loss
    of the global parameters (default: crosses_eval_step); `on_round` gets each round's record once its outer
    step is applied, `on_eval` each held-out point."""
    H, tps = config.inner.steps, workload.tokens_per_step
    phases = exp.pool or ((exp.replicas, config.max_rounds),)
    num_rounds = sum(r for _, r in phases)
    active_per_round = [k for k, r in phases for _ in range(r)]
    should_evaluate = should_evaluate or crosses_eval_step(exp, H, num_rounds)
    replicas = make_replicas(config, exp, workload)
    curve, tokens_seen, step_offset = [], 0, 0
    if exp.warm_start_steps:
        curve.append(warm_start_(config, exp, workload, replicas))
        tokens_seen, step_offset = curve[-1]["tokens"], exp.warm_start_steps
    outer_class = AdamOuter if exp.outer_optimizer == "adam" else OuterOptimizer
    outer = outer_class(list(replicas[0].model.parameters()), config.outer)  # θ0: after any warm start
    run = ReplicaRun(outer=outer, curve=curve)
    total_steps = step_offset + (config.inner.total_steps or num_rounds * H)
    drop_rng = random.Random(exp.seed_drop)
    overlap, delay = exp.overlap_delay_steps >= 0, exp.overlap_delay_steps
    if delay > H:
        raise ValueError(f"--overlap-delay-steps must be at most --inner-steps ({H}), got {delay}")
    eval_model = copy.deepcopy(workload.model)  # replicas keep their local models (overlap trains on them)
    # overlap: replica index -> its local params at the end of the last round; that round's average, pending
    snapshots: dict[int, list[torch.Tensor]] = {}
    pending: tuple[int, list[torch.Tensor] | None] | None = None
    round_clock: list[float] = []  # simulated time at the end of each round

    def finish_round(index: int, averaged: list[torch.Tensor] | None) -> None:
        """Round `index`'s outer step, then its hash and (if asked) the held-out loss."""
        if averaged is not None:
            outer.step_(averaged)
        record = run.rounds[index]
        record["global_params_sha256"] = outer.params_hash()
        per_replica_step = step_offset + (index + 1) * H
        if should_evaluate(index, per_replica_step):
            outer.copy_to_(list(eval_model.parameters()))
            point = {
                "step": per_replica_step,
                "tokens": record["tokens"],
                "eval_loss": evaluate(eval_model, workload.held_out, CPU),
                "sim_time": round_clock[index],
            }
            record["eval_loss"] = point["eval_loss"]
            run.curve.append(point)
            if on_eval is not None:
                on_eval(point)
        if on_round is not None:
            on_round(record)

    def train_(replica: Replica, *, first_step: int, num_steps: int) -> list[float]:
        return train_inner_steps_(
            replica,
            config=config,
            first_global_step=step_offset + first_step,
            num_steps=num_steps,
            total_steps=total_steps,
        )

    for round_index in range(num_rounds):
        active = replicas[: active_per_round[round_index]]
        steps = round_steps(active, H=H, round_tokens=exp.round_tokens, tokens_per_step=tps)
        losses, pseudo_grads, tokens, keys = [], [], [], []
        first_steps = [min(delay, n) for n in steps] if overlap else [0] * len(active)
        if overlap:
            # the first `delay` inner steps run from the local params while last round's average is in flight
            for i, (replica, num_steps) in enumerate(zip(active, first_steps, strict=True)):
                if i not in snapshots:  # first round, or new to the pool: start from θ, carry progress over
                    outer.copy_to_(list(replica.model.parameters()))
                    if pending is not None:
                        snapshots[i] = [g.clone() for g in outer.global_params]
                losses += train_(replica, first_step=round_index * H, num_steps=num_steps)
            if pending is not None:  # it arrives: outer step, then local <- θ + (local - snapshot)
                finish_round(*pending)
                pending = None
                for i, replica in enumerate(active):
                    outer.rebase_(list(replica.model.parameters()), snapshots[i])
        for replica, num_steps, done in zip(active, steps, first_steps, strict=True):
            params = list(replica.model.parameters())
            if not overlap:
                outer.copy_to_(params)
            losses += train_(replica, first_step=round_index * H + done, num_steps=num_steps - done)
            if num_steps == 0:
                continue
            if exp.drop_prob and drop_rng.random() < exp.drop_prob:
                run.num_dropped += 1  # the work is lost; the replica restarts from the new θ like the others
                continue
            pseudo_grads.append(outer.pseudo_gradient(params))
            tokens.append(num_steps * tps)
            keys.append(replica.order_key)
        if overlap:
            snapshots = {
                i: [p.detach().clone() for p in replica.model.parameters()]
                for i, replica in enumerate(active)
            }
        # simulated clock: compute time of each replica; the round ends when the slowest is done
        busy = [n / r.speed for n, r in zip(steps, active, strict=True)]
        # (with a token budget the round ends when the step that filled it completes; steps still in flight
        # on other replicas are discarded and counted as idle)
        round_time = max(busy)
        run.sim_time += round_time
        run.idle_time += sum(round_time - b for b in busy)
        round_clock.append(run.sim_time)
        averaged = None
        if pseudo_grads:
            averaged = compressed_average(
                pseudo_grads,
                tokens=tokens,
                order_keys=keys,
                compression=exp.compression,
                aggregation=config.outer.aggregation,
            ).averaged
        tokens_seen += sum(steps) * tps
        run.rounds.append(
            {
                "round": round_index + 1,
                "loss": sum(losses) / max(1, len(losses)),
                "group_size": len(pseudo_grads),
                "inner_steps": steps,
                "tokens": tokens_seen,
            }
        )
        if overlap:
            pending = (round_index, averaged)
        else:
            finish_round(round_index, averaged)
    if pending is not None:  # every run ends on a θ that includes the last round's work
        finish_round(*pending)
    return run
