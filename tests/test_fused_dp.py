"""Fused DP-SGD (training/fused.py) against Opacus: the same clipped sums, noise scale, sampling, accounting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from training import fused
from training.trainer import TrainOptions, build_model, train

pytestmark = pytest.mark.filterwarnings("ignore")


def _batch(n: int = 64, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:8] *= 25.0  # a few rows with large gradients, so clipping binds for some and not others
    y = (torch.rand(n, generator=g) < 0.3).float()
    w = torch.rand(n, generator=g) * 2
    return x, y, w


def _opacus_clipped(model: torch.nn.Module, x, y, w, C: float):
    """Opacus's own per-sample gradients, clipped and summed as DPOptimizer.clip_and_accumulate does."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    losses = torch.nn.functional.binary_cross_entropy_with_logits(gsm(x).squeeze(-1), y, reduction="none")
    (losses * w if w is not None else losses).sum().backward()
    params = [p for p in gsm.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(2, dim=-1) for p in params], dim=1).norm(2, dim=1)
    clip = (C / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", clip, p.grad_sample) for p in params], norms


@pytest.mark.parametrize("weighted", [False, True])
def test_clipped_sums_equal_opacus_per_sample_clipping(weighted: bool):
    torch.manual_seed(3)
    model = build_model(5, (16, 8))
    x, y, w = _batch()
    w = w if weighted else None
    want, want_norms = _opacus_clipped(model, x, y, w, C=2.0)
    dp = fused.FusedDPSGD(model, noise_multiplier=0.0, max_grad_norm=2.0, expected_batch_size=1.0,
                          generator=torch.Generator().manual_seed(0))
    sums, norms = dp.clipped_sums(x, y, w)
    got = [t for pair in sums for t in pair]  # weight, bias per layer: Opacus's parameter order
    assert torch.allclose(norms, want_norms, rtol=1e-4, atol=1e-6)
    assert (norms > 2.0).any() and (norms < 2.0).any()  # both clipped and unclipped samples were checked
    for g, o in zip(got, want, strict=True):
        assert torch.allclose(g, o, rtol=1e-4, atol=1e-6)
    # backward() with no noise sets exactly those sums, over the expected batch size
    dp.expected_batch_size = 16.0
    dp.backward(x, y, w)
    for p, o in zip([p for m in dp.linears for p in (m.weight, m.bias)], want):
        assert torch.allclose(p.grad, o / 16.0, rtol=1e-4, atol=1e-7)


def test_noise_has_standard_deviation_sigma_times_C_and_empty_batches_still_step():
    torch.manual_seed(4)
    model = build_model(5, (48, 48))
    x, y, _ = _batch()
    sigma, C, L = 1.7, 0.8, 32.0
    clean = fused.FusedDPSGD(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=L,
                             generator=torch.Generator().manual_seed(0))
    sums, _ = clean.clipped_sums(x, y)
    dp = fused.FusedDPSGD(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=L,
                          generator=torch.Generator().manual_seed(1))
    dp.backward(x, y)
    noise = torch.cat([(p.grad * L - s).reshape(-1) for m, pair in zip(dp.linears, sums)
                       for p, s in zip((m.weight, m.bias), pair)])
    assert noise.numel() > 2500
    assert abs(noise.mean().item()) < 0.1 * sigma * C
    assert noise.std().item() == pytest.approx(sigma * C, rel=0.06)
    empty = fused.FusedDPSGD(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=L,
                             generator=torch.Generator().manual_seed(2))
    empty.backward(x[:0], y[:0])  # nobody sampled: the step is pure noise, and it is still taken
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * L
    assert torch.isfinite(g).all() and g.std().item() == pytest.approx(sigma * C, rel=0.06)


def test_poisson_epoch_draws_each_row_at_each_step_with_probability_q():
    n, q, steps = 20_000, 1 / 40, 40
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(25):
        batches = fused.poisson_epoch(n, q, steps, g, "cpu")
        assert len(batches) == steps
        for b in batches:
            assert torch.equal(b, torch.unique(b))  # sorted, no row twice in a step
            counts[b] += 1
            sizes.append(len(b))
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    assert sizes_t.mean().item() == pytest.approx(n * q, rel=0.01)
    assert sizes_t.var().item() == pytest.approx(n * q * (1 - q), rel=0.15)  # binomial, like poisson_batch
    per_row = counts / 25  # each row: Binomial(steps, q) per epoch, mean steps·q = 1
    assert per_row.mean().item() == pytest.approx(steps * q, rel=0.01)
    assert (counts / 25).var().item() * 25 == pytest.approx(steps * q * (1 - q), rel=0.05)
    with pytest.raises(ValueError, match="sample_rate"):
        fused.poisson_epoch(n, 0.0, steps, g, "cpu")


def test_fused_training_uses_opacus_noise_calibration_and_accounting():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + rng.normal(scale=0.5, size=3000) > 0).astype(np.float32)
    opts = dict(epochs=2, batch_size=100, target_epsilon=1.5, delta=1e-5, accountant="prv", device="cpu")
    f = train(X, y, TrainOptions(grad_sample_mode="fused", **opts))
    o = train(X, y, TrainOptions(grad_sample_mode="ghost", **opts))
    assert f.noise_multiplier == pytest.approx(o.noise_multiplier, rel=1e-9)
    assert f.sample_rate == pytest.approx(o.sample_rate) == pytest.approx(1 / 30)
    assert f.epsilon == pytest.approx(o.epsilon, rel=1e-6) and f.epsilon <= 1.5 + 1e-6
    w = np.where(X[:, 2] > 0, 2.0, 0.5)
    fw = train(X, y, TrainOptions(grad_sample_mode="fused", **opts), sample_weight=w)  # reweighing, still fused
    assert fw.epsilon == pytest.approx(f.epsilon, rel=1e-6)


def test_only_linear_relu_mlps_are_fused():
    from torch import nn

    assert fused.supports(build_model(4, (8, 8)))
    assert not fused.supports(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    assert not fused.supports(nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 1)))
    assert not fused.supports(nn.Sequential(nn.Linear(4, 2)))
    assert not fused.supports(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 1)))
    assert not fused.supports(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)))
    assert fused.supports(nn.Sequential(nn.Linear(4, 1)))
    with pytest.raises(ValueError, match="Linear/ReLU"):
        fused.FusedDPSGD(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=10, generator=torch.Generator())
