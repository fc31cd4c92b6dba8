from __future__ import annotations

import math

import pytest
import torch

from peer.config import DataConfig, InnerConfig, RunConfig
from peer.inner import build_inner_optimizer, evaluate, inner_lr, inner_step, schedule_step
from peer.model import build_model, load_model_config


def test_warmup_is_linear_to_the_peak():
    config = InnerConfig(lr=1e-3, warmup_steps=10)
    assert inner_lr(0, config=config, total_steps=100) == pytest.approx(1e-4)
    assert inner_lr(4, config=config, total_steps=100) == pytest.approx(5e-4)
    assert inner_lr(9, config=config, total_steps=100) == pytest.approx(1e-3)


def test_cosine_decays_to_the_floor_and_stays_there():
    config = InnerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert inner_lr(10, config=config, total_steps=110) == pytest.approx(1e-3)
    halfway = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert inner_lr(60, config=config, total_steps=110) == pytest.approx(halfway)
    assert inner_lr(110, config=config, total_steps=110) == pytest.approx(1e-4)
    assert inner_lr(500, config=config, total_steps=110) == pytest.approx(1e-4)


def test_without_a_horizon_the_rate_stays_at_the_peak():
    config = InnerConfig(lr=2e-4, warmup_steps=5)
    assert inner_lr(10_000, config=config, total_steps=0) == pytest.approx(2e-4)


def test_schedule_is_a_function_of_the_global_step():
    """A late joiner at round r uses the same rate as everyone else (round x H + inner step)."""
    config = InnerConfig(lr=1e-3, warmup_steps=100, steps=50, min_lr_ratio=0.1)
    late = schedule_step(3, 7, steps_per_round=50)
    assert late == 157
    # past the 100 warmup steps: 57 of the 900 cosine steps done
    cosine = 0.5 * (1 + math.cos(math.pi * 57 / 900))
    assert inner_lr(late, config=config, total_steps=1000) == pytest.approx(1e-3 * (0.1 + 0.9 * cosine))
    # not the rate of a peer counting its own steps from zero, which would still be warming up
    assert inner_lr(
        schedule_step(0, 7, steps_per_round=50), config=config, total_steps=1000
    ) == pytest.approx(8e-5)


def test_extra_steps_of_a_fast_peer_stay_in_their_round_of_the_schedule():
    # H = 10: steps 0..9 of round 3 are positions 30..39; a --round-tokens peer's 25th step is still 39
    assert [schedule_step(3, step, steps_per_round=10) for step in (0, 9, 10, 24)] == [30, 39, 39, 39]
    assert schedule_step(4, 0, steps_per_round=10) == 40


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_model(load_model_config("tiny", vocab_size=256, max_seq_len=32), seed=seed)


def _batch(num_sequences: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (num_sequences, 32), generator=torch.Generator().manual_seed(1))


def test_four_micro_batches_of_two_are_one_batch_of_eight():
    """Gradient accumulation: the same loss and step as the whole batch, to float tolerance. Plain SGD with no
    clipping moves each weight by lr x gradient, so a wrongly weighted micro-batch would show (Adam would
    hide a wrong scale, and amplifies rounding differences of gradients near zero)."""
    whole, accumulated = _tiny_model(), _tiny_model()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (whole, accumulated)]
    for step in range(2):
        batch = _batch() + step
        loss = inner_step(whole, optimizers[0], batch % 256, lr=0.1, grad_clip=0.0)
        micro = inner_step(accumulated, optimizers[1], batch % 256, lr=0.1, grad_clip=0.0, micro_batch_size=2)
        assert micro == pytest.approx(loss, rel=1e-6)
    moved = 0.0
    for a, b, start in zip(
        whole.parameters(), accumulated.parameters(), _tiny_model().parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-3  # the steps did move the weights


def test_a_micro_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="--micro-batch-size must divide --batch-size 8"):
        DataConfig(batch_size=8, micro_batch_size=3)
    assert DataConfig(batch_size=8, micro_batch_size=2).micro_batch_size == 2


def test_bf16_autocast_keeps_fp32_weights_and_changes_only_the_rounding():
    fp32, bf16 = _tiny_model(), _tiny_model()
    opt32, opt16 = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (fp32, bf16))
    loss32 = inner_step(fp32, opt32, _batch(), lr=1e-3, grad_clip=1.0)
    loss16 = inner_step(bf16, opt16, _batch(), lr=1e-3, grad_clip=1.0, autocast_dtype=torch.bfloat16)
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)  # autocast ran, in bf16
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt16.state.values())
    held_out = [_batch(4)]
    assert evaluate(bf16, held_out, torch.device("cpu"), autocast_dtype=torch.bfloat16) == pytest.approx(
        evaluate(bf16, held_out, torch.device("cpu")), rel=1e-2
    )


def test_adamw8bit_needs_cuda():
    with pytest.raises(ValueError, match="adamw8bit needs the model on a CUDA device"):
        build_inner_optimizer(_tiny_model(), InnerConfig(optimizer="adamw8bit"))
    with pytest.raises(ValueError, match="adamw8bit needs a CUDA device"):
        RunConfig(device="cpu", inner=InnerConfig(optimizer="adamw8bit"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw8bit_and_bf16_train_on_cuda():
    model = _tiny_model().cuda()
    optimizer = build_inner_optimizer(model, InnerConfig(optimizer="adamw8bit", lr=3e-3))
    batch = _batch().cuda()
    losses = [
        inner_step(
            model, optimizer, batch, lr=3e-3, grad_clip=1.0, micro_batch_size=4, autocast_dtype=torch.bfloat16
        )
        for _ in range(10)
    ]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(
        s.dtype == torch.uint8
        for state in optimizer.state.values()
        for s in state.values()
        if torch.is_tensor(s)
    )
