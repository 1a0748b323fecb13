"""Frechet distance between two sets of feature vectors (the FID formula, any feature space)."""

from __future__ import annotations

import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), computed in float64.

    The symmetric form avoids the complex square roots of scipy.linalg.sqrtm on S_a S_b.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Frechet distance needs at least two feature vectors per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross)
