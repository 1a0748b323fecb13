import pytest
import torch

from patronus.evaluation.frechet import frechet_distance


def test_frechet_matches_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2 * 2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_needs_two_samples():
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
