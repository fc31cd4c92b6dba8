"""Device choice, precision and the per-round utilization figures (CPU here; the CUDA half is marked gpu)."""

from __future__ import annotations

import pytest
import torch

from peer.device import (
    autocast_dtype,
    configure_,
    flops_per_token,
    model_flops_utilization,
    peak_flops,
    peak_flops_of,
    reset_peak_memory_,
    resolve_device,
    round_utilization,
)
from peer.model import build_model, load_model_config

CPU = torch.device("cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_devices_resolve_and_a_missing_gpu_is_a_clear_error():
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        with pytest.raises(ValueError, match="CUDA devices"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert resolve_device("auto") == CPU
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=f"--device {name} was requested but no CUDA device"):
                resolve_device(name)


def test_precision_auto_is_bf16_on_cuda_only_and_the_cpu_math_is_left_alone():
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    before = torch.get_float32_matmul_precision()
    configure_(CPU)
    assert torch.get_float32_matmul_precision() == before


def test_flops_per_token_counts_the_matmul_weights_and_attention():
    tied = build_model(load_model_config("tiny", vocab_size=512, max_seq_len=64), seed=0)
    num_params = sum(p.numel() for p in tied.parameters())
    layers, hidden = tied.config.num_hidden_layers, tied.config.hidden_size
    assert flops_per_token(tied, seq_len=64) == 6 * num_params + 12 * layers * hidden * 64
    config = load_model_config("tiny", vocab_size=512, max_seq_len=64)
    config.tie_word_embeddings = False
    untied = build_model(config, seed=0)
    # the input embedding is a lookup; the separate output layer is a matmul
    matmul_params = sum(p.numel() for p in untied.parameters()) - 512 * hidden
    assert matmul_params == num_params
    assert flops_per_token(untied, seq_len=64) == 6 * matmul_params + 12 * layers * hidden * 64


def test_peak_flops_by_device_name_and_mfu():
    assert peak_flops_of("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops_of("NVIDIA H200", None) == 495e12  # fp32 weights: TF32 tensor cores
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12  # not the A10
    assert peak_flops_of("NVIDIA A10G", torch.bfloat16) == 125e12
    assert peak_flops_of("NVIDIA L40S", torch.bfloat16) == 362e12  # not the L4
    assert peak_flops_of("NVIDIA L4", torch.bfloat16) == 121e12
    assert peak_flops_of("Tesla K80", torch.bfloat16) is None
    assert peak_flops(CPU, torch.bfloat16) is None
    assert model_flops_utilization(tokens_per_s=1000.0, flops_per_token=2e9, peak_flops=4e12) == 0.5
    assert model_flops_utilization(tokens_per_s=1000.0, flops_per_token=2e9, peak_flops=None) is None
    assert round_utilization(CPU, tokens_per_s=1e3, flops_per_token=1e9, dtype=None) == {
        "peak_memory_bytes": None,
        "mfu": None,
    }


@pytest.mark.gpu
@requires_cuda
def test_cuda_tf32_bf16_memory_and_mfu():
    device = resolve_device("cuda")
    configure_(device)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" or torch.backends.cuda.matmul.allow_tf32
    assert autocast_dtype("auto", device) is torch.bfloat16
    assert peak_flops(device, torch.bfloat16) is not None, torch.cuda.get_device_name(device)
    model = build_model(load_model_config("small", vocab_size=8192, max_seq_len=256), seed=0).to(device)
    reset_peak_memory_(device)
    batch = torch.randint(0, 8192, (8, 256), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=batch, labels=batch).loss.backward()
    figures = round_utilization(
        device, tokens_per_s=1e5, flops_per_token=flops_per_token(model, seq_len=256), dtype=torch.bfloat16
    )
    assert figures["peak_memory_bytes"] > sum(p.numel() * 4 for p in model.parameters())
    assert 0 < figures["mfu"] < 1
