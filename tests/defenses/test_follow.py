"""`unet.w_follow`'s measure: the share of R a LoRA took off the empty prompt (b) against the share
of the captions' shift kappa R it took off them (a)."""

import pytest
import torch

from patronus.defenses.patronus.follow import follow_loss


def test_follow_loss_is_the_squared_gap_between_the_two_shares_along_r():
    torch.manual_seed(0)
    r = torch.randn(3, 4, 8, 8)
    r[2] = 0.0  # below the refusal's noise threshold: R vanishes, the row does not count
    unc0, cond0 = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    kappa, other = 0.75, torch.randn(3, 4, 8, 8)
    other -= (other * r).sum((1, 2, 3), keepdim=True) / (r * r).sum((1, 2, 3), keepdim=True).clamp_min(1e-12) * r
    # b = 0.5 on both rows; a = 0.5 and 0.9; a change orthogonal to R does not count
    unc1 = unc0 - 0.5 * r + other
    cond1 = cond0 - kappa * torch.tensor([0.5, 0.9, 0.3]).view(-1, 1, 1, 1) * r
    assert follow_loss(unc0, cond0, unc1, cond1, r, kappa).item() == pytest.approx((0.0 + 0.4 ** 2) / 2, rel=1e-4)
    assert follow_loss(unc0, cond0, unc1, cond1, torch.zeros_like(r), kappa).item() == 0.0
