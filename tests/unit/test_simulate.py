"""The experiment runner behind `python -m peer.simulate`: documented JSON, the k=1/H=1 identity with plain
training, token-weighted averaging, and the ablation knobs (tiny model, tiny H, a few seconds in all)."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

from peer.cli import config_from_args
from peer.data import data_seed, train_batches
from peer.experiments import experiment_workload, run_diloco
from peer.inner import build_inner_optimizer, inner_lr, inner_step
from peer.outer import OuterOptimizer, average_contributions
from peer.replicas import AdamOuter, ExperimentConfig, InMemoryAverager, Replica, parse_pool, round_steps
from peer.simulate import main, simulate

TINY_RUN = "--model tiny --seq-len 16 --batch-size 2 --warmup-steps 2 --num-threads 1 --seed 3"
TINY = f"{TINY_RUN} --eval-windows 4"
RESULT_KEYS = {
    "mode",
    "replicas",
    "inner_steps",
    "num_syncs",
    "tokens",
    "steps",
    "final_eval_loss",
    "final_perplexity",
    "best_eval_loss",
    "curve",
    "wall_s",
    "config",
    "experiment",
}
DILOCO_KEYS = {"rounds", "global_params_sha256", "sim_time", "idle_fraction", "num_dropped"}


def run_cli(flags: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(f"{TINY} {flags} --json".split()) == 0
    return json.loads(out.getvalue())


def test_runner_json_has_documented_keys_in_every_mode():
    results = run_cli("--mode compare --replicas 2 --inner-steps 2 --max-rounds 2 --eval-every-steps 2")
    assert set(results) == {"diloco", "data-parallel", "single"}
    for mode, result in results.items():
        assert set(result) >= RESULT_KEYS, mode
        assert result["mode"] == mode
        assert result["steps"] == 4
        assert result["final_perplexity"] == pytest.approx(
            torch.tensor(result["final_eval_loss"]).exp().item()
        )
        assert [p["step"] for p in result["curve"]] == [2, 4]
    assert set(results["diloco"]) >= DILOCO_KEYS
    # equal tokens for DiLoCo and data-parallel (k x batch), 1/k of them for the single peer
    assert results["diloco"]["tokens"] == results["data-parallel"]["tokens"] == 2 * 4 * 2 * 16
    assert results["single"]["tokens"] == 4 * 2 * 16
    assert results["diloco"]["num_syncs"] == 2 and results["data-parallel"]["num_syncs"] == 4


def test_bad_flags_end_in_one_clear_error(capsys):
    assert main(f"{TINY} --mode nope --max-rounds 1".split()) == 2
    assert "--mode must be one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--pool"):
        parse_pool("4,2")
    with pytest.raises(ValueError, match="--speeds"):
        ExperimentConfig(replicas=2, speeds=(1.0,))


@pytest.fixture(scope="module")
def setup():
    """Tokenizer, corpus, held-out windows and the initial model, shared by the tests below."""
    return experiment_workload(_config("--max-rounds 1"), ExperimentConfig(eval_windows=4))


def _config(flags: str):
    config, _ = config_from_args(f"{TINY_RUN} {flags}".split())
    return config


def test_simulate_is_the_experiments_diloco_loop_with_the_peers_records():
    """simulate() (the networked swarm's reference) runs the one replica loop: contiguous shards, exact
    averaging, and a networked peer's records with its --eval-every cadence on its own held-out batches."""
    config = _config("--inner-steps 2 --max-rounds 3 --eval-every 2 --eval-batches 1")
    seen = []
    records = simulate(config, num_replicas=2, on_round=seen.append)
    assert seen == records
    assert [set(r) for r in records] == [
        {"round", "loss", "group_size", "tokens", "global_params_sha256"},
        {"round", "loss", "group_size", "tokens", "global_params_sha256", "eval_loss"},
        {"round", "loss", "group_size", "tokens", "global_params_sha256"},
    ]
    assert [r["tokens"] for r in records] == [2 * 2 * 2 * 16 * n for n in (1, 2, 3)]
    result = run_diloco(
        config,
        ExperimentConfig(replicas=2, eval_every_steps=100),
        experiment_workload(config, ExperimentConfig(eval_windows=2)),
    )
    assert [r["global_params_sha256"] for r in result["rounds"]] == [
        r["global_params_sha256"] for r in records
    ]
    assert len(set(r["global_params_sha256"] for r in records)) == 3


def test_simulation_modules_import_one_way():
    """simulate -> experiments -> replicas -> workload, never back (the loop exists once, below its users)."""
    import ast
    import importlib

    def imported(module: str) -> set[str]:
        tree = ast.parse(open(importlib.import_module(module).__file__).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    order = ["peer.simulate", "peer.experiments", "peer.replicas", "peer.workload"]
    for i, module in enumerate(order):
        for above in order[:i]:
            assert above not in imported(module), f"{module} imports {above}"
    assert "peer.train" not in imported("peer.workload")


def test_one_replica_one_step_plain_outer_step_is_plain_training(monkeypatch, setup):
    """k=1, H=1, outer lr 1, momentum 0: θ_new = θ - 1 * (θ - θ_local). In fp32, θ - (θ - θ_local) == θ_local
    exactly whenever θ and θ_local are within a factor of 2 of each other (Sterbenz), which holds for almost
    every element after a small AdamW step but not for values near zero: after the first step about 0.06% of
    the elements differ, by ~1e-11, and the gap stays at the 1e-7 level. So the check is a tight tolerance,
    per step (training loss, bitwise equal in practice) and on the parameters, not bit for bit."""
    num_steps = 6
    config = _config(f"--inner-steps 1 --max-rounds {num_steps} --outer-lr 1 --outer-momentum 0")
    exp = ExperimentConfig(replicas=1, eval_every_steps=100)
    thetas = []
    original_step = OuterOptimizer.step_

    def recording_step(self, grads):
        original_step(self, grads)
        thetas.append(torch.cat([p.flatten() for p in self.global_params]))

    monkeypatch.setattr(OuterOptimizer, "step_", recording_step)
    result = run_diloco(config, exp, setup)

    model = copy.deepcopy(setup.model)
    optimizer = build_inner_optimizer(model, config.inner)
    batches = train_batches(  # replica 0 of 1 = a peer with --data-shard 0/1
        setup.corpus.train, batch_size=2, seq_len=16, seed=data_seed(config.seed, "0/1"), shard=(0, 1)
    )
    for step, record in enumerate(result["rounds"]):
        lr = inner_lr(step, config=config.inner, total_steps=num_steps)
        loss = inner_step(model, optimizer, next(batches), lr=lr, grad_clip=config.inner.grad_clip)
        plain = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert record["loss"] == pytest.approx(loss, rel=1e-6), step
        assert torch.allclose(thetas[step], plain, rtol=0, atol=1e-6), (
            step,
            (thetas[step] - plain).abs().max(),
        )


def test_token_weighted_averaging_weights_exactly_by_tokens():
    a, b, c = torch.full((5,), 4.0), torch.full((5,), 8.0), torch.full((5,), -2.0)
    tokens = [1000, 3000, 4000]
    averaged = average_contributions([a, b, c], tokens, [b"a", b"b", b"c"])
    assert torch.equal(averaged, torch.full((5,), 4.0 * 0.125 + 8.0 * 0.375 - 2.0 * 0.5))
    # the canonical order makes the result independent of the order contributions arrive in
    x, y, z = (torch.randn(1000, generator=torch.Generator().manual_seed(s)) for s in range(3))
    first = average_contributions([x, y, z], [7, 11, 13], [b"x", b"y", b"z"])
    again = average_contributions([z, x, y], [13, 7, 11], [b"z", b"x", b"y"])
    assert torch.equal(first, again)
    # and the simulation's averager is that function, per tensor
    result = InMemoryAverager().average_round([[x], [y]], tokens=[1, 3], order_keys=[b"x", b"y"])
    assert torch.equal(result.averaged[0], average_contributions([x, y], [1, 3], [b"x", b"y"]))
    assert result.tokens == 4 and result.group_size == 2


def test_heterogeneous_rounds_split_the_token_budget_by_speed():
    replicas = [Replica(None, None, None, b"", speed) for speed in (1.0, 1.0, 1.0, 0.5)]
    assert round_steps(replicas, H=5, round_tokens=0, tokens_per_step=10) == [5, 5, 5, 5]
    assert round_steps(replicas, H=5, round_tokens=70, tokens_per_step=10) == [2, 2, 2, 1]
    assert sum(round_steps(replicas, H=5, round_tokens=200, tokens_per_step=10)) == 20


def test_heterogeneous_simulation_reports_idle_time(setup):
    config = _config("--inner-steps 4 --max-rounds 1")
    fixed = run_diloco(config, ExperimentConfig(replicas=2, speeds=(1.0, 0.5)), setup)
    assert fixed["sim_time"] == 8.0 and fixed["idle_fraction"] == pytest.approx(0.25)
    budget = run_diloco(
        config, ExperimentConfig(replicas=2, speeds=(1.0, 0.5), round_tokens=8 * 2 * 16), setup
    )
    assert budget["rounds"][0]["inner_steps"] == [5, 3] or budget["rounds"][0]["inner_steps"] == [6, 2]
    assert budget["tokens"] == fixed["tokens"] and budget["sim_time"] < fixed["sim_time"]


def test_dropped_updates_pool_and_warm_start(setup):
    config = _config("--inner-steps 1 --max-rounds 3")
    dropped = run_diloco(config, ExperimentConfig(replicas=2, drop_prob=0.5, seed_drop=1), setup)
    assert dropped["num_dropped"] > 0
    assert sum(2 - r["group_size"] for r in dropped["rounds"]) == dropped["num_dropped"]
    pooled = run_diloco(config, ExperimentConfig(pool=((1, 1), (3, 2))), setup)
    assert [len(r["inner_steps"]) for r in pooled["rounds"]] == [1, 3, 3]
    warm = run_diloco(config, ExperimentConfig(replicas=2, warm_start_steps=2), setup)
    assert warm["curve"][0]["step"] == 2 and warm["steps"] == 5


def test_adam_outer_first_step_moves_each_parameter_by_about_lr():
    config = _config("--outer-lr 0.01")
    params = [torch.zeros(3)]
    adam = AdamOuter(params, config.outer)
    adam.step_([torch.tensor([1e-3, -2.0, 5.0])])
    assert torch.allclose(adam.global_params[0], torch.tensor([-0.01, 0.01, -0.01]), atol=1e-6)


def test_a_run_started_from_saved_weights_continues_from_them(tmp_path):
    """--init-from: round 1 of a run from a model saved after some training starts where that model was."""
    from peer.replicas import run_replicas

    config = _config("--inner-steps 8 --max-rounds 2 --inner-lr 0.003 --eval-every 0")
    workload = experiment_workload(config, ExperimentConfig(eval_windows=4))
    trained = run_replicas(config, ExperimentConfig(replicas=1), workload)
    trained.outer.copy_to_(list(workload.model.parameters()))
    workload.model.save_pretrained(tmp_path)
    fresh = simulate(config, num_replicas=1)
    args = f"{TINY_RUN} --inner-steps 8 --max-rounds 2 --inner-lr 0.003 --eval-every 0".replace(
        "--model tiny", ""
    )
    warm, _ = config_from_args([*args.split(), "--init-from", str(tmp_path)])
    started = simulate(warm, num_replicas=1)
    assert started[0]["loss"] < fresh[0]["loss"] - 1.0, (started[0]["loss"], fresh[0]["loss"])
    assert started[0]["loss"] < trained.rounds[-1]["loss"]  # it goes on from there


def test_the_simulation_takes_the_peers_micro_batches():
    plain = simulate(_config("--inner-steps 2 --max-rounds 1 --eval-every 0"), num_replicas=1)
    micro = simulate(
        _config("--inner-steps 2 --max-rounds 1 --eval-every 0 --micro-batch-size 1"), num_replicas=1
    )
    assert micro[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert micro[0]["global_params_sha256"] != plain[0]["global_params_sha256"]  # it did split the batch
