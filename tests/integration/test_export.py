"""A real peer's checkpoint directory, exported with `python -m peer.export`, is the swarm's model in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.integration.harness import FAST_PEER_ARGS, child_env


@pytest.mark.timeout(300)
def test_a_peers_checkpoint_exports_to_the_model_it_evaluated(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peer.config import DataConfig
    from peer.data import Tokenizer, eval_batches, load_corpus

    metrics, ckpt, out = tmp_path / "m.jsonl", tmp_path / "ckpt", tmp_path / "model"
    peer = [sys.executable, "-m", "peer", *FAST_PEER_ARGS, "--max-rounds", "2", "--eval-every", "1"]
    peer += ["--checkpoint-dir", str(ckpt), "--metrics-file", str(metrics)]
    ran = subprocess.run(peer, env=child_env(), capture_output=True, text=True, timeout=200)
    assert ran.returncode == 0, ran.stderr[-3000:]
    exported = subprocess.run(
        [sys.executable, "-m", "peer.export", "--checkpoint", str(ckpt), "--out", str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "exported round 2" in exported.stdout

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the held-out loss the peer logged for round 2's global parameters, recomputed with the exported model
    corpus = load_corpus(DataConfig(seq_len=64), Tokenizer("embedded"))
    batches = eval_batches(corpus.eval, batch_size=4, seq_len=64, num_batches=8)
    with torch.no_grad():
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    logged = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    assert logged["round"] == 2
    assert loss == pytest.approx(logged["eval_loss"], abs=1e-5)
    prompt = tokenizer("The king", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(prompt, max_new_tokens=10, do_sample=False)[0])
    assert text.startswith("The king") and len(text) > len("The king")


@pytest.mark.timeout(400)
def test_a_live_swarm_exports_the_global_parameters_its_peers_hold(local_swarm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peer.outer import tensors_sha256

    local_swarm.start_bootstrap()
    peers = [
        local_swarm.start_peer(f"peer{i}", "--wait-for-peers", "2", "--run-id", "export-me") for i in range(2)
    ]
    local_swarm.wait_rounds(peers, 2, timeout_s=240)
    out = tmp_path / "model"
    exported = subprocess.run(
        [sys.executable, "-m", "peer.export", "--initial-peers", *local_swarm.bootstrap_maddrs]
        + ["--run-id", "export-me", "--out", str(out), "--timeout-s", "120"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    provenance = json.loads((out / "diloco_swarm.json").read_text())
    assert provenance["round"] >= 2

    # exactly the global parameters both peers logged for that round
    logged = {
        r["global_params_sha256"]
        for peer in peers
        for r in peer.records()
        if r["round"] == provenance["round"]
    }
    assert logged == {provenance["params_sha256"]}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tensors_sha256(list(model.parameters())) == provenance["params_sha256"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The king", return_tensors="pt").input_ids
    assert tokenizer.decode(model.generate(prompt, max_new_tokens=5, do_sample=False)[0]).startswith(
        "The king"
    )
    for peer in peers:  # the exporter's visit left the swarm training
        assert peer.alive()
    local_swarm.wait_rounds(peers, provenance["round"] + 1, timeout_s=120)

    unknown = subprocess.run(
        [sys.executable, "-m", "peer.export", "--initial-peers", *local_swarm.bootstrap_maddrs]
        + ["--run-id", "no-such-run", "--out", str(tmp_path / "none"), "--timeout-s", "5"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 1 and "no live peer of run 'no-such-run'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
