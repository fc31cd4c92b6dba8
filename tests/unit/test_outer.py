from __future__ import annotations

import torch

from peer.config import OuterConfig
from peer.outer import OuterOptimizer, average_contributions, contribution_key, tensors_sha256


def test_pseudo_gradient_is_global_minus_local():
    outer = OuterOptimizer([torch.tensor([1.0, 2.0])], OuterConfig())
    (grad,) = outer.pseudo_gradient([torch.tensor([0.5, 3.0])])
    assert torch.equal(grad, torch.tensor([0.5, -1.0]))  # local moved down on x, up on y


def test_outer_step_matches_hand_computed_nesterov():
    lr, mu = 0.7, 0.9
    outer = OuterOptimizer([torch.tensor([1.0, -2.0])], OuterConfig(lr=lr, momentum=mu))
    g1, g2 = torch.tensor([0.1, -0.2]), torch.tensor([0.3, 0.05])
    outer.step_([g1])
    # step 1: buf = g1; theta = theta0 - lr * (g1 + mu * g1)
    expected1 = torch.tensor([1.0, -2.0]) - lr * (g1 + mu * g1)
    torch.testing.assert_close(outer.global_params[0], expected1)
    outer.step_([g2])
    buf = mu * g1 + g2
    expected2 = expected1 - lr * (g2 + mu * buf)
    torch.testing.assert_close(outer.global_params[0], expected2)
    torch.testing.assert_close(outer.momentum[0], buf)


def test_outer_step_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    theta = torch.randn(100)
    grads = [torch.randn(100) for _ in range(5)]
    outer = OuterOptimizer([theta], OuterConfig(lr=0.7, momentum=0.9))
    reference = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for grad in grads:
        outer.step_([grad])
        reference.grad = grad.clone()
        sgd.step()
    torch.testing.assert_close(outer.global_params[0], reference.detach(), rtol=1e-6, atol=1e-6)


def test_plain_averaging_with_lr_one_and_no_momentum_lands_on_the_local_mean():
    outer = OuterOptimizer([torch.zeros(3)], OuterConfig(lr=1.0, momentum=0.0))
    locals_ = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    grads = [outer.pseudo_gradient([p])[0] for p in locals_]
    outer.step_([average_contributions(grads, [1.0, 1.0], [b"a", b"b"])])
    assert torch.equal(outer.global_params[0], torch.tensor([2.0, 2.0, 2.0]))


def test_average_weights_by_tokens_and_ignores_arrival_order():
    parts = [torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([10.0])]
    weights = [1.0, 2.0, 1.0]
    keys = [b"\x03", b"\x01", b"\x02"]
    result = average_contributions(parts, weights, keys)
    torch.testing.assert_close(result, torch.tensor([(1 + 8 + 10) / 4.0]))
    torch.manual_seed(1)
    big = [torch.randn(1000) for _ in range(4)]
    w, k = [3.0, 1.0, 7.0, 2.0], [contribution_key([b]) for b in big]
    forward = average_contributions(big, w, k)
    backward = average_contributions(big[::-1], w[::-1], k[::-1])
    assert tensors_sha256([forward]) == tensors_sha256([backward])  # bit-identical whatever the order


def test_state_round_trip():
    outer = OuterOptimizer([torch.ones(2, 2)], OuterConfig(momentum=0.9))
    outer.step_([torch.full((2, 2), 0.5)])
    other = OuterOptimizer([torch.zeros(2, 2)], OuterConfig(momentum=0.9))
    other.load_state_tensors_(outer.state_tensors())
    assert other.params_hash() == outer.params_hash()
    assert torch.equal(other.momentum[0], outer.momentum[0])


def test_overlapped_update_without_inner_progress_equals_the_non_overlapped_update():
    torch.manual_seed(2)
    theta = [torch.randn(64), torch.randn(8, 8)]
    local = [t - 0.01 * torch.randn_like(t) for t in theta]
    plain, overlapped = (OuterOptimizer(theta, OuterConfig(lr=0.7, momentum=0.9)) for _ in range(2))
    for _ in range(3):  # a few rounds so that momentum is involved
        grads = plain.pseudo_gradient(local)
        plain.step_(grads)
        plain_local = [torch.empty_like(t) for t in theta]
        plain.copy_to_(plain_local)

        snapshot = [p.clone() for p in local]  # taken when the all-reduce starts
        overlapped.step_(overlapped.pseudo_gradient(snapshot))
        overlapped_local = [p.clone() for p in local]  # no inner steps ran during the all-reduce
        overlapped.rebase_(overlapped_local, snapshot)

        assert tensors_sha256(overlapped_local) == tensors_sha256(plain_local)
        assert tensors_sha256(overlapped.global_params) == tensors_sha256(plain.global_params)
        local = [p - 0.01 * torch.ones_like(p) for p in plain_local]


def test_overlapped_update_carries_the_progress_made_since_the_snapshot():
    outer = OuterOptimizer([torch.tensor([1.0, 1.0])], OuterConfig(lr=1.0, momentum=0.0))
    snapshot = [torch.tensor([0.5, 1.5])]
    outer.step_(outer.pseudo_gradient(snapshot))  # theta <- snapshot (plain averaging of one peer)
    local = [torch.tensor([0.25, 2.0])]  # two more inner steps moved the local model on
    outer.rebase_(local, snapshot)
    assert torch.equal(local[0], torch.tensor([0.25, 2.0]))
    outer.step_([torch.tensor([0.5, 0.5])])  # the swarm moved theta to [0, 1]
    outer.rebase_(local, [torch.tensor([0.25, 2.0])])
    assert torch.equal(local[0], torch.tensor([0.0, 1.0]))


def test_hashes_are_those_of_the_tensors_and_follow_every_change():
    torch.manual_seed(0)
    outer = OuterOptimizer([torch.randn(3, 4), torch.randn(5)], OuterConfig(lr=0.7, momentum=0.9))

    def fresh() -> tuple[str, str]:
        return tensors_sha256(outer.global_params), tensors_sha256(outer.state_tensors())

    assert outer.hashes() == fresh()
    outer.step_([torch.ones(3, 4), torch.ones(5)])
    assert outer.hashes() == fresh()
    before = outer.hashes()
    outer.load_state_tensors_([t + 1 for t in outer.state_tensors()])
    assert outer.hashes() == fresh() != before
    outer.global_params[0].add_(1e-3)  # a change behind the optimizer's back is seen once it is announced
    outer.changed()
    assert outer.hashes() == fresh()
    assert (outer.params_hash(), outer.state_hash()) == fresh()
