"""Scale-free quality figures of a stochastic gradient estimator, from per-batch gradient estimates.

A policy-gradient estimator's *total* variance ``E||g - E g||^2`` depends on the scale of its gradients (a
biased estimator with larger gradients shows a larger variance and can still be the more precise one), so
esolm compares estimators by two scale-free figures (``benchmarks/rl.py``):

* **signal-to-noise** of one batch's gradient, ``||E g||^2 / tr Cov(g)``: with ``n`` batch gradients, the
  unbiased ``(||mean||^2 - tr^ / n) / tr^`` where ``tr^`` is the unbiased trace of the sample covariance
  (``||mean||^2`` alone overestimates ``||E g||^2`` by ``tr Cov / n``; the estimate can come out negative
  when the signal is below the noise of the mean); ``snr_plugin`` is ``||mean||^2 / tr^``;
* **cosine to a large-batch reference gradient**: for each batch ``i``, ``cos(g_i, r_i)`` with ``r_i`` a
  fixed reference vector, or the mean of a reference estimator's gradients over the *other* batches
  (leave-one-out: a reference computed on the same rollouts as ``g_i`` would share its noise); mean,
  standard deviation and quantiles over batches.

Both are unchanged when every gradient is multiplied by a constant. For an unbiased estimator whose
reference is the true gradient, ``E cos`` is about ``1 / sqrt(1 + 1 / snr)`` in high dimension.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def snr_from_moments(mean_norm2: float, trace: float, batches: int) -> tuple[float, float]:
    """(unbiased, plug-in) signal-to-noise from ``||mean||^2``, the unbiased covariance trace and ``n``; NaN
    for gradients that are all zero (every batch's rewards tied: no signal and no noise), inf for a constant
    non-zero gradient."""
    if trace <= 0:
        value = float("nan") if mean_norm2 == 0 else float("inf")
        return value, value
    return (mean_norm2 - trace / batches) / trace, mean_norm2 / trace


def gradient_quality(grads: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """Signal-to-noise and cosine-to-reference figures (module docstring) of ``grads`` [n, d], ``n >= 2``
    per-batch gradient estimates. ``reference``: ``None`` (the leave-one-out mean of ``grads``), a fixed [d]
    vector, or [n, d] gradients of a reference estimator on the same ``n`` batches (its leave-one-out mean).
    Computed in float64."""
    g = grads.double()
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"need gradients [n >= 2, d], got shape {tuple(g.shape)}")
    n = g.shape[0]
    mean = g.mean(0)
    trace = float((g - mean).square().sum()) / (n - 1)
    mean_norm2 = float(mean.square().sum())
    snr, plugin = snr_from_moments(mean_norm2, trace, n)
    ref = g if reference is None else reference.double()
    if ref.ndim == 1:
        refs = ref.expand_as(g)
    elif ref.shape == g.shape:
        refs = (ref.sum(0, keepdim=True) - ref) / (n - 1)  # row i: the mean over the other batches
    else:
        raise ValueError(f"reference must be [d] or [n, d] like the gradients {tuple(g.shape)}, got {tuple(ref.shape)}")
    cos = torch.nn.functional.cosine_similarity(g, refs, dim=1, eps=1e-300)
    q = torch.quantile(cos, torch.tensor([0.1, 0.5, 0.9], dtype=cos.dtype)).tolist()
    return {"batches": n, "snr": snr, "snr_plugin": plugin, "trace_cov": trace, "mean_norm2": mean_norm2,
            "cosine_mean": float(cos.mean()), "cosine_std": float(cos.std()), "cosine_min": float(cos.min()),
            "cosine_q10": q[0], "cosine_median": q[1], "cosine_q90": q[2], "cosine_max": float(cos.max())}


__all__ = ["gradient_quality", "snr_from_moments"]
