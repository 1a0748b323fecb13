"""`unet.w_follow`: a benign user's LoRA, trained alongside alignment, and the term that makes the
empty prompt's refusal come off with the other prompts' guidance shift when such a LoRA trains.

With `target = "empty-refusal"` every prompt's prediction carries a shift that cancels the refusing
empty prompt under guidance. A benign LoRA's plain denoising loss sees that shift first and takes it
off the prompts it trains faster than the refusal off the empty prompt, which it never sees, and
guided samples land between the two (docs/research-log.md, 2026-12-06). Here a LoRA on the benign
fine-tune's targets (the attention projections) trains on the defender's own nonsense-word captions,
restarted every `follow_reset_every` steps so that alignment meets LoRAs of every age, and the term
asks that the share of the refusal direction R it takes off the empty prompt equal the share it
takes off the captions' shift, through the weights beneath the LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from patronus.nft.lora import LoRAView, Params
from patronus.nft.maml import checkpoints_follow_the_call
from patronus.training import mix_seed

FOLLOW_SEED = 5_100_000  # + the LoRA's period: its initialisation and its captions' nonsense words


class BenignLoRA:
    """A rank-`rank` LoRA on `targets` over the live weights of `unet`, trained by Adam at `lr` on
    the plain denoising loss with the weights beneath it held fixed; `reset(period)` draws a fresh
    one (B zero, as peft starts; A drawn as peft's default, where the benchmark's `unet-lora`
    draws it Gaussian)."""

    def __init__(self, unet: torch.nn.Module, rank: int, lr: float, seed: int, targets: tuple[str, ...]):
        self.unet, self.rank, self.lr, self.seed, self.targets = unet, rank, lr, seed, targets
        self.reset(0)

    def reset(self, period: int) -> None:
        g = torch.Generator().manual_seed(mix_seed(self.seed, FOLLOW_SEED + period))
        self.view = LoRAView(dict(self.unet.named_parameters()), self.rank, g, self.targets)
        self.opt = torch.optim.Adam(self.view.parameters(), lr=self.lr)

    def params(self, through: str) -> Params:
        """The weights with the LoRA added; gradients reach `through` ("lora" or "base") only."""
        out = {k: v.detach() if through == "lora" else v for k, v in self.view.base.items()}
        for name, (a, b) in self.view.factors.items():
            delta = (b @ a).view_as(out[name])
            out[name] = out[name] + (delta if through == "lora" else delta.detach())
        return out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, through: str) -> torch.Tensor:
        with checkpoints_follow_the_call(self.unet):  # gradient checkpointing recomputes with these weights
            return functional_call(self.unet, self.params(through), (x_t, t, hidden), {"return_dict": False})[0]

    def train_step(self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor) -> float:
        loss = F.mse_loss(self.forward(x_t, t, hidden, "lora"), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        torch.clear_autocast_cache()  # under mixed precision the next forward must see the updated factors
        return loss.item()

    def state(self) -> dict[str, torch.Tensor]:
        """The factors and Adam's moments, as flat tensors a checkpoint keeps."""
        out = {f"lora.{i}": p.detach() for i, p in enumerate(self.view.parameters())}
        for i, s in self.opt.state_dict()["state"].items():
            out |= {f"adam.{i}.{k}": v for k, v in s.items()}
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.view.parameters()):
                p.copy_(tensors[f"lora.{i}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("adam."):
                _, i, k = key.split(".")
                state.setdefault(int(i), {})[k] = v
        self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})


def follow_loss(unc_before: torch.Tensor, cond_before: torch.Tensor, unc_after: torch.Tensor,
                cond_after: torch.Tensor, refusal: torch.Tensor, kappa: float) -> torch.Tensor:
    """Mean square of (b - a) per sample: b the share of the refusal direction `refusal` (R, the
    empty prompt's target minus the original's prediction) the LoRA took off the empty prompt,
    a the share of the captions' shift (kappa R) it took off them. Samples where R vanishes (below
    the refusal's noise threshold) do not count."""
    r2 = refusal.flatten(1).pow(2).sum(1)
    keep = r2 > 1e-6 * refusal[0].numel()
    if not keep.any():
        return unc_after.sum() * 0.0
    along = lambda d: (d.flatten(1) * refusal.flatten(1)).sum(1)[keep] / r2[keep]  # noqa: E731
    b = -along(unc_after - unc_before)
    a = -along(cond_after - cond_before) / kappa
    return ((b - a) ** 2).mean()
