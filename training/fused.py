"""DP-SGD for the reference MLP with per-sample clipping in closed form ("fused" mode).

For a linear layer ``z = a Wᵀ + b``, sample *i*'s gradient is ``δᵢ aᵢᵀ`` for the weight and
``δᵢ`` for the bias, where ``δᵢ = ∂ℓᵢ/∂zᵢ``. Its squared norm is ``‖δᵢ‖²·(‖aᵢ‖² + 1)``: the
ghost-norm identity Opacus's ghost clipping is built on (Goodfellow 2015; Li et al. 2022).
So one forward pass and one backward pass to the layer outputs (written out for this
model, without an autograd graph) give every sample's whole-model gradient norm, and the sum of the clipped gradients is one matrix product per
layer, ``(c ⊙ δ)ᵀ a``, with ``cᵢ = min(1, C / (‖gᵢ‖ + 1e-6))``. No per-sample gradient is
ever materialized, and no module hooks or second backward pass run.

One step is Opacus's DP-SGD step, term for term:

1. Poisson sampling: each row joins the batch independently with probability ``q`` (as
   Opacus's ``UniformWithReplacementSampler``); an empty batch still takes a noisy step;
2. flat clipping of each sample's whole gradient to ``C`` (``DPOptimizer.clip_and_accumulate``);
3. Gaussian noise ``N(0, σ²C²)`` added to every coordinate of the summed clipped gradient
   (``add_noise``);
4. division by the expected batch size ``qN`` (``scale_grad`` with "mean" reduction);
5. the wrapped optimizer's step, and one ``accountant.step(σ, q)`` in an Opacus accountant.

σ comes from Opacus's ``get_noise_multiplier`` for (ε, δ, q, epochs) and the ε reported is
the Opacus accountant's, so the privacy analysis is Opacus's own; this module only replaces
the per-step machinery, which on a 2-core CPU cost 4× a plain step for this model
(``benchmarks/bench_training.py``). ``tests/test_fused_dp.py`` checks the clipped sums
against Opacus's per-sample gradients and the noise scale against σC.

Scope: ``nn.Sequential`` of ``nn.Linear`` (with bias) and ``nn.ReLU``, ending in a linear
layer with one logit, trained with binary cross-entropy: the model ``build_model`` makes.
Anything else uses Opacus's own modes (``supports`` says which). Noise comes from torch's
generator, seeded for reproducibility, as Opacus's default (non-secure) mode; a deployment
that needs a cryptographically secure noise source uses Opacus's ``secure_mode`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def supports(model: nn.Module) -> bool:
    """True when ``model`` is Linear, (ReLU, Linear)*, with biases and one logit out."""
    if not isinstance(model, nn.Sequential) or len(model) % 2 == 0:
        return False
    for i, m in enumerate(model):
        if i % 2 == 0:
            if not isinstance(m, nn.Linear) or m.bias is None:
                return False
        elif not isinstance(m, nn.ReLU):
            return False
    return model[len(model) - 1].out_features == 1


class FusedDPSGD:
    """Clipped, noised, scaled gradients for one Poisson batch; the caller's optimizer steps."""

    def __init__(self, model: nn.Sequential, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, generator: torch.Generator) -> None:
        if not supports(model):
            raise ValueError("fused DP-SGD needs an nn.Sequential of Linear/ReLU layers ending in one logit")
        if max_grad_norm <= 0 or expected_batch_size <= 0 or noise_multiplier < 0:
            raise ValueError("max_grad_norm and expected_batch_size must be > 0, noise_multiplier ≥ 0")
        self.model = model
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator

    def clipped_sums(self, xb: torch.Tensor, yb: torch.Tensor,
                     wb: torch.Tensor | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per layer, the summed clipped (weight, bias) gradients; and each sample's gradient norm.

        The backward pass is written out, as the model allows: for the unreduced binary
        cross-entropy ``ℓᵢ = BCE(zᵢ, yᵢ)``, ``∂ℓᵢ/∂zᵢ = σ(zᵢ) - yᵢ`` at the logit, and through
        a layer ``δ ← (δ W) ⊙ [z > 0]``. No autograd graph is built. ``wb`` weights each
        sample's loss (reweighing): sample *i* contributes ``wᵢ·ℓᵢ`` and is clipped as a
        whole, so no weight can raise anyone's influence above ``C``.
        """
        with torch.no_grad():
            acts: list[torch.Tensor] = []  # the input of each linear layer
            pre: list[torch.Tensor] = []  # each hidden layer's pre-activation
            h = xb
            for i, m in enumerate(self.linears):
                acts.append(h)
                z = F.linear(h, m.weight, m.bias)
                if i < len(self.linears) - 1:
                    pre.append(z)
                    h = torch.relu(z)
                else:
                    h = z
            d = torch.sigmoid(h) - yb.reshape(-1, 1)
            if wb is not None:
                d = d * wb.reshape(-1, 1)
            deltas = [d]
            for i in range(len(self.linears) - 1, 0, -1):
                d = (d @ self.linears[i].weight) * (pre[i - 1] > 0)
                deltas.append(d)
            deltas.reverse()
            sq = torch.zeros(len(xb), dtype=xb.dtype, device=xb.device)
            for a, d in zip(acts, deltas):
                sq += (d * d).sum(1) * ((a * a).sum(1) + 1.0)
            norms = sq.sqrt_()
            clip = (self.max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)
            sums = []
            for a, d in zip(acts, deltas):
                dc = d * clip[:, None]
                sums.append((dc.T @ a, dc.sum(0)))
        return sums, norms

    def backward(self, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor | None = None) -> None:
        """Set every parameter's ``.grad`` to the DP-SGD gradient of this batch."""
        sums, _norms = self.clipped_sums(xb, yb, wb)
        std = self.noise_multiplier * self.max_grad_norm
        flat = [g for pair in sums for g in pair]
        if std > 0:  # one draw for all parameters, split in Opacus's parameter order
            noise = torch.normal(0.0, std, size=(sum(g.numel() for g in flat),), device=flat[0].device,
                                 dtype=flat[0].dtype, generator=self.generator)
            flat = [g + n.view_as(g) for g, n in zip(flat, torch.split(noise, [g.numel() for g in flat]))]
        params = [p for m in self.linears for p in (m.weight, m.bias)]
        with torch.no_grad():
            for p, g in zip(params, flat):
                p.grad = g.div_(self.expected_batch_size) if std > 0 else g / self.expected_batch_size


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator, device: Any) -> torch.Tensor:
    """Row indices of one Poisson batch: each of ``n`` rows joins with probability ``sample_rate``."""
    return (torch.rand(n, generator=generator, device=device) < sample_rate).nonzero().squeeze(1)


def poisson_epoch(n: int, sample_rate: float, steps: int, generator: torch.Generator, device: Any) -> list[torch.Tensor]:
    """The row indices of ``steps`` Poisson batches at once, drawn row-wise.

    Each row joins each step independently with probability ``q`` (what ``poisson_batch``
    draws step by step), so the steps at which one row joins form a Bernoulli process: the
    gaps between them are geometric, ``P(gap = k) = (1 - q)^(k-1) q``. Drawing those gaps
    costs about ``n·(1 + steps·q)`` random numbers for the epoch instead of ``n·steps``.
    Within a batch, rows come in increasing order, as ``poisson_batch`` gives them.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (got {sample_rate})")
    if sample_rate == 1:
        return [torch.arange(n, device=device) for _ in range(steps)]
    log1m = torch.log1p(torch.tensor(-sample_rate, dtype=torch.float64, device=device))
    rows = torch.arange(n, device=device)
    at = torch.full((n,), -1, dtype=torch.int64, device=device)
    hits_step, hits_row = [], []
    while len(rows):
        u = 1.0 - torch.rand(len(rows), dtype=torch.float64, generator=generator, device=device)  # in (0, 1]
        at = at + torch.floor(torch.log(u) / log1m).to(torch.int64) + 1
        keep = at < steps
        rows, at = rows[keep], at[keep]
        hits_step.append(at)
        hits_row.append(rows)
    step = torch.cat(hits_step)
    row = torch.cat(hits_row)
    order = torch.argsort(step * n + row)
    counts = torch.bincount(step, minlength=steps).tolist()
    return list(torch.split(row[order], counts))
