"""Optional Weights & Biases logging: a peer's per-round metrics (a MetricsSink) and a monitor's swarm aggregate.
wandb is an optional extra (`pip install 'diloco-swarm[wandb]'`), imported only when --wandb-project is given;
WANDB_MODE=offline writes runs to disk for a later `wandb sync`."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

PEER_KEYS = (
    "loss",
    "eval_loss",
    "tokens",
    "round_tokens",
    "tokens_per_s",
    "inner_s",
    "allreduce_s",
    "sync_wait_s",
    "transfer_s",
    "bytes_sent",
    "bytes_received",
    "group_size",
    "lr",
    "failed_rounds",
    "resyncs",
)
"""The numbers of a metrics record worth a chart (README "Metrics"); the rest are identifiers and timestamps."""
SWARM_KEYS = (
    "loss",
    "eval_loss",
    "tokens",
    "peers",
    "hash_peers",
    "hash_agreeing",
    "live_peers",
    "bytes_sent",
    "bytes_received",
)


class WandbError(RuntimeError):
    """wandb is missing or cannot start; one line the user can act on."""


def _start_run(project: str, **init_args):
    try:
        import wandb
    except ImportError:
        raise WandbError(
            "--wandb-project needs the wandb package: pip install 'diloco-swarm[wandb]' (or pip install wandb)"
        ) from None
    try:
        run = wandb.init(project=project, **init_args)
    except Exception as e:  # not logged in, no network, bad project name: wandb raises many types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WandbError(
            f"wandb could not start a run in project {project!r} ({first_line}); "
            "run `wandb login`, or set WANDB_MODE=offline to log to disk"
        ) from None
    run.define_metric("round")
    run.define_metric("*", step_metric="round")  # rounds, not wandb's own step counter, are the x axis
    return run


class WandbMetrics:
    """A peer's MetricsSink: each round's numbers, as one wandb run per peer, grouped by the run id."""

    def __init__(self, project: str, *, run_id: str, peer_id: str, config: dict):
        self.run = _start_run(project, name=f"{run_id}-{peer_id[-6:]}", group=run_id, config=config)

    def log_round(self, record: dict) -> None:
        values = {key: record[key] for key in PEER_KEYS if isinstance(record.get(key), int | float)}
        try:
            self.run.log({"round": record["round"], **values})
        except Exception as e:  # a logging service is never worth a failed round
            logger.warning(f"wandb log failed: {e!r}")

    def finish(self) -> None:
        self.run.finish()


class SwarmWandb:
    """A monitor's sink: the swarm's aggregate for each settled round (token-weighted losses, agreement, totals)."""

    def __init__(self, project: str, *, run_id: str):
        self.run = _start_run(project, name=f"{run_id}-swarm", group=run_id, config={"run_id": run_id})

    def __call__(self, row: dict) -> None:
        values = {f"swarm/{key}": row[key] for key in SWARM_KEYS if isinstance(row.get(key), int | float)}
        self.run.log({"round": row["round"], **values})

    def finish(self) -> None:
        self.run.finish()
