"""`unet.w_follow`'s measure: the share of R a LoRA took off the empty prompt (b) against the share
of the captions' shift kappa R it took off them (a)."""

import pytest
import torch

from patronus.defenses.patronus.follow import BenignLoRA, follow_loss


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


def test_the_lora_step_moves_only_its_factors_and_the_term_reaches_only_the_weights_beneath():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))

    class Net(torch.nn.Module):  # called as the UNet is: (x_t, t, hidden, return_dict=False)
        def __init__(self):
            super().__init__()
            self.to_q = net

        def forward(self, x, t, h, return_dict=False):
            return (self.to_q(x + h),)

    unet = Net()
    lora = BenignLoRA(unet, rank=2, lr=0.1, seed=0, targets=("to_q.0", "to_q.2"))
    before = {k: v.detach().clone() for k, v in unet.named_parameters()}
    factors = [p.detach().clone() for p in lora.view.parameters()]
    x, h = torch.randn(3, 4), torch.randn(3, 4)
    lora.train_step(x, None, h, torch.randn(3, 4))
    assert all(torch.equal(before[k], v) for k, v in unet.named_parameters())
    assert all(p.grad is None for p in unet.parameters())
    assert any(not torch.equal(f, p) for f, p in zip(factors, lora.view.parameters()))
    for p in lora.view.parameters():
        p.grad = None
    lora.forward(x, None, h, "base").sum().backward()
    assert all(p.grad is not None for p in unet.parameters())
    assert all(p.grad is None for p in lora.view.parameters())
