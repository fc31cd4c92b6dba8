"""The inner optimizer: AdamW (or bitsandbytes 8-bit AdamW), its schedule on the swarm's global step, one step."""

from __future__ import annotations

import math

import torch

from peer.config import InnerConfig, RunConfig
from peer.device import autocast, autocast_dtype


def build_inner_optimizer(model: torch.nn.Module, config: InnerConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norms and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw8bit":
        if any(p.device.type != "cuda" for p in model.parameters()):
            raise ValueError("--inner-optimizer adamw8bit needs the model on a CUDA device (bitsandbytes)")
        import bitsandbytes as bnb  # lazy: only GPU peers that ask for it need bitsandbytes

        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def inner_lr(global_step: int, *, config: InnerConfig, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio x peak at total_steps (constant if 0)."""
    if global_step < config.warmup_steps:
        return config.lr * (global_step + 1) / config.warmup_steps
    if total_steps <= config.warmup_steps:
        return config.lr
    progress = min(1.0, (global_step - config.warmup_steps) / (total_steps - config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def schedule_step(round_index: int, step: int, *, steps_per_round: int) -> int:
    """The lr schedule's position of inner step `step` of a round. With --round-tokens a fast peer does more than
    H steps in a round: its extra steps stay at the round's last position instead of running ahead into the
    next rounds' schedule (which the slower peers would only reach later)."""
    return round_index * steps_per_round + min(step, steps_per_round - 1)


def set_lr_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def inner_step_options(config: RunConfig, device: torch.device) -> dict:
    """The settings' keyword arguments of inner_step on `device` (everything but the lr)."""
    return {
        "grad_clip": config.inner.grad_clip,
        "micro_batch_size": config.data.micro_batch_size,
        "autocast_dtype": autocast_dtype(config.precision, device),
    }


def inner_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    micro_batch_size: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One AdamW step on a (batch, seq) token tensor; returns the training loss.

    With micro_batch_size (a divisor of the batch), the gradients of the micro-batches are accumulated, each
    weighted by its share of the batch: the same step as the whole batch at once, up to float rounding."""
    set_lr_(optimizer, lr)
    model.train()
    if not micro_batch_size or micro_batch_size >= len(batch):
        with autocast(batch.device, autocast_dtype):
            loss = model(input_ids=batch, labels=batch).loss  # causal LM: labels are shifted inside the model
        loss.backward()
        total = loss.detach()
    else:
        total = torch.zeros((), device=batch.device)
        for micro in batch.split(micro_batch_size):  # (micro_batch_size, seq)
            with autocast(batch.device, autocast_dtype):
                loss = model(input_ids=micro, labels=micro).loss
            share = len(micro) / len(batch)  # every sequence has the same number of tokens
            (loss * share).backward()
            total += loss.detach() * share
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean held-out loss over fixed batches."""
    model.eval()
    losses = []
    for batch in batches:
        batch = batch.to(device)
        with autocast(batch.device, autocast_dtype):
            losses.append(model(input_ids=batch, labels=batch).loss.item())
    return sum(losses) / max(1, len(losses))
