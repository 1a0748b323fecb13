"""The simulated attacker's low-rank update, applied functionally (no module is wrapped or copied)."""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


class LoRAView:
    """Low-rank updates W + B @ A on the conv/linear weights of a parameter dict, as peft adds
    them with `lora_alpha = r` (scale 1): A drawn like peft's default (kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B zero, so training starts at W.
    A conv's A is a (r, in, k, k) kernel and its B a 1x1 conv, which is B @ A on the flattened
    weight. `targets` limits them to modules whose name ends with one of its entries (peft's
    `target_modules` as a list, e.g. the UNet attack's attention projections); None: every one."""

    def __init__(self, base: Params, rank: int, generator: torch.Generator, targets: tuple[str, ...] | None = None):
        self.base = base
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, w in base.items():
            module = name.removesuffix(".weight")
            if targets is not None and not any(module == t or module.endswith("." + t) for t in targets):
                continue
            if name.endswith("weight") and w.dim() in (2, 4):
                out_dim, in_dim = w.shape[0], w[0].numel()
                r = min(rank, out_dim, in_dim)
                # Drawn on the CPU generator, so the attack is the same whatever device `w` is on.
                a = ((torch.rand(r, in_dim, generator=generator) * 2 - 1) / in_dim ** 0.5).to(w).requires_grad_(True)
                b = torch.zeros(out_dim, r, dtype=w.dtype, device=w.device, requires_grad=True)  # identity, like peft
                self.factors[name] = (a, b)

    def parameters(self) -> list[torch.Tensor]:
        return [t for ab in self.factors.values() for t in ab]

    def effective(self) -> Params:
        out = dict(self.base)
        for name, (a, b) in self.factors.items():
            out[name] = self.base[name] + (b @ a).view_as(self.base[name])
        return out
