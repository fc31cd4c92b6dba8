"""The accelerator: which device a peer trains on, its precision (bf16 autocast over fp32 master weights, TF32
matmuls on CUDA), and how well a round used it (peak memory, model FLOPs utilization).

The global parameters and the outer optimizer stay fp32 on the CPU whatever the device (peer.outer), so the
precision is a local choice: peers with different ones average to the same bit-identical θ.
"""

from __future__ import annotations

import contextlib

import torch

# Dense (no sparsity) peak tensor-core throughput in FLOP/s from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come before general ones.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12}),  # SXM
    ("GH200", {"bf16": 989e12, "tf32": 495e12}),
    ("H200", {"bf16": 989e12, "tf32": 495e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12}),
    ("L40", {"bf16": 181e12, "tf32": 90.5e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12}),
    ("A10", {"bf16": 125e12, "tf32": 62.5e12}),  # A10 and A10G
    ("RTX 4090", {"bf16": 165e12, "tf32": 82.6e12}),  # with fp32 accumulation, as autocast uses
    ("RTX 3090", {"bf16": 71e12, "tf32": 35.6e12}),
)


def resolve_device(name: str) -> torch.device:
    """--device: auto (the first CUDA device if there is one), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def configure_(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (the usual setting for training; CPU math is left as it
    is, so the CPU simulation and tests stay bit-exact). Selects the device for this process."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision: the autocast dtype of the forward pass, or None for plain fp32.
    auto: bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if use_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass: parameters and gradients stay fp32, matmuls run in `dtype`."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def reset_peak_memory_(device: torch.device) -> None:
    """Start measuring a round's peak memory (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory tensors held on the device since reset_peak_memory_ (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def flops_per_token(model: torch.nn.Module, *, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward) of a decoder-only transformer, as in PaLM's MFU
    (Chowdhery et al. 2022, appendix B): 6 N for the weight matmuls plus 12 L d T for attention, where N counts
    the parameters that multiply (the input embedding is a lookup unless it is tied to the output layer), L the
    layers, d the hidden size and T the sequence length."""
    config = model.config
    num_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if not getattr(config, "tie_word_embeddings", False):
        num_params -= embedding.numel()
    return 6.0 * num_params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak FLOP/s for the precision in use (bf16 autocast, else TF32), where known; None on the
    CPU and on GPUs missing from PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), dtype)


def peak_flops_of(device_name: str, dtype: torch.dtype | None) -> float | None:
    """PEAK_FLOPS of a CUDA device by its name: bf16 with autocast, TF32 without; None if unknown."""
    kind = "bf16" if dtype == torch.bfloat16 else "tf32"
    for substring, peaks in PEAK_FLOPS:
        if substring in device_name:
            return peaks[kind]
    return None


def model_flops_utilization(
    *, tokens_per_s: float, flops_per_token: float, peak_flops: float | None
) -> float | None:
    """The share of the device's peak throughput the model's FLOPs used (None when the peak is unknown)."""
    if peak_flops is None or peak_flops <= 0:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def round_utilization(
    device: torch.device, *, tokens_per_s: float, flops_per_token: float, dtype: torch.dtype | None
) -> dict:
    """The per-round metrics fields: peak_memory_bytes (CUDA, since reset_peak_memory_) and mfu (None where
    unknown, e.g. on the CPU)."""
    return {
        "peak_memory_bytes": peak_memory_bytes(device),
        "mfu": model_flops_utilization(
            tokens_per_s=tokens_per_s, flops_per_token=flops_per_token, peak_flops=peak_flops(device, dtype)
        ),
    }
