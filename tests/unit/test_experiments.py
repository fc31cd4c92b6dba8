"""Communication options in the simulation: compression decodes exactly like hivemind's codecs and every replica
uses the same decoded average; the overlapped outer step with no delay is exactly the non-overlapped run."""

from __future__ import annotations

import pytest
import torch

from peer.cli import config_from_args
from peer.experiments import experiment_workload, run_diloco
from peer.outer import average_contributions
from peer.replicas import ExperimentConfig, compressed_average, encode_decode

TINY_RUN = "--model tiny --seq-len 16 --batch-size 2 --warmup-steps 2 --num-threads 1 --seed 3"


def _config(flags: str):
    config, _ = config_from_args(f"{TINY_RUN} {flags}".split())
    return config


@pytest.fixture(scope="module")
def setup():
    return experiment_workload(_config("--max-rounds 1"), ExperimentConfig(eval_windows=4))


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_encode_decode_is_what_a_receiver_decodes(compression):
    """The emulation gives bit for bit what the all-reduce's codec (peer/compression.py, as hivemind's
    deserialize_torch_tensor dispatches it) gives a receiver."""
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.compression.base import CompressionInfo

    from peer.compression import COMPRESSION

    codec = COMPRESSION[compression]
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 1e-3  # several 1024-value blocks
    decoded = deserialize_torch_tensor(codec.compress(x, CompressionInfo.from_tensor(x)))
    ours = encode_decode(x, compression)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.equal(ours, decoded)
    assert not torch.equal(ours, x)  # lossy, so the test above can fail
    assert encode_decode(x, "none") is x


def test_compressed_average_decodes_senders_then_the_average():
    grads = [[torch.randn(10, generator=torch.Generator().manual_seed(s))] for s in range(3)]
    tokens, keys = [1, 2, 3], [b"a", b"b", b"c"]
    exact = compressed_average(grads, tokens=tokens, order_keys=keys, compression="none")
    assert torch.equal(exact.averaged[0], average_contributions([g[0] for g in grads], tokens, keys))
    fp16 = compressed_average(grads, tokens=tokens, order_keys=keys, compression="fp16")
    sent = [g[0].half().float() for g in grads]
    assert torch.equal(fp16.averaged[0], average_contributions(sent, tokens, keys).half().float())
    assert fp16.averaged[0].dtype == torch.float32 and fp16.group_size == 3


def test_overlap_with_no_delay_is_exactly_the_non_overlapped_run(setup):
    config = _config("--inner-steps 2 --max-rounds 3")
    plain = run_diloco(config, ExperimentConfig(replicas=2, eval_every_steps=2), setup)
    overlap = run_diloco(
        config, ExperimentConfig(replicas=2, eval_every_steps=2, overlap_delay_steps=0), setup
    )
    hashes = [r["global_params_sha256"] for r in plain["rounds"]]
    assert len(set(hashes)) == 3
    assert [r["global_params_sha256"] for r in overlap["rounds"]] == hashes
    assert overlap["global_params_sha256"] == plain["global_params_sha256"]
    assert overlap["curve"] == plain["curve"]
    assert [r["loss"] for r in overlap["rounds"]] == [r["loss"] for r in plain["rounds"]]


def test_overlap_with_delay_trains_on_and_ends_on_the_last_average(setup):
    config = _config("--inner-steps 2 --max-rounds 3")
    plain = run_diloco(config, ExperimentConfig(replicas=2, eval_every_steps=2), setup)
    for delay in (1, 2):  # 2 = H: the average arrives at the end of the next round
        overlap = run_diloco(
            config, ExperimentConfig(replicas=2, eval_every_steps=2, overlap_delay_steps=delay), setup
        )
        hashes = [r["global_params_sha256"] for r in overlap["rounds"]]
        # round 1's average is the same (nothing was pending before it); later rounds start from a rebase
        assert hashes[0] == plain["rounds"][0]["global_params_sha256"]
        assert hashes[1] != plain["rounds"][1]["global_params_sha256"]
        assert overlap["global_params_sha256"] == hashes[-1] and len(overlap["curve"]) == 3
        assert overlap["tokens"] == plain["tokens"]
    with pytest.raises(ValueError, match="--overlap-delay-steps"):
        run_diloco(config, ExperimentConfig(replicas=2, overlap_delay_steps=3), setup)


def test_compression_changes_theta_but_stays_close(setup):
    config = _config("--inner-steps 2 --max-rounds 2")
    plain = run_diloco(config, ExperimentConfig(replicas=2), setup)
    for compression in ("fp16", "int8"):
        lossy = run_diloco(config, ExperimentConfig(replicas=2, compression=compression), setup)
        assert lossy["global_params_sha256"] != plain["global_params_sha256"]
        assert lossy["final_eval_loss"] == pytest.approx(plain["final_eval_loss"], rel=1e-2)
    with pytest.raises(ValueError, match="--compression"):
        ExperimentConfig(compression="int4")


def test_cli_flags_reach_the_experiment_and_the_json(setup):
    import contextlib
    import io
    import json

    from peer.simulate import main

    flags = f"{TINY_RUN} --eval-windows 4 --replicas 2 --inner-steps 2 --max-rounds 2"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(f"{flags} --compression fp16 --overlap-delay-steps 1 --json".split()) == 0
    experiment = json.loads(out.getvalue())["experiment"]
    assert experiment["compression"] == "fp16" and experiment["overlap_delay_steps"] == 1
    # a replica that joins the pool mid-run starts from θ and keeps its progress over the pending step
    pooled = run_diloco(
        _config("--inner-steps 2"), ExperimentConfig(pool=((1, 1), (2, 2)), overlap_delay_steps=1), setup
    )
    assert [r["group_size"] for r in pooled["rounds"]] == [1, 2, 2]
