"""Simulated fine-tuning attacks on the moderator and their first-order MAML gradient.

Each outer step of non-fine-tunable learning samples an attack (optimizer, learning rate,
batch size, number of steps, objective, full or LoRA updates), plays it on a functional
copy of the decoder parameters with `torch.func.functional_call` (the module is never
deep-copied), and scores the adapted decoder along the trajectory with the *query loss*:
the refusal loss on held-out unsafe latents. First-order MAML applies the query gradient
taken at the adapted parameters to the original ones.

The inner loop uses stock `torch.optim` optimizers on detached parameter copies: first-order
MAML needs no gradient through the updates, and the simulated attacker then behaves exactly
like a real one. Second-order MAML (plain SGD only) differentiates through the updates and
needs the math attention kernel, because the fused CPU kernels have no double backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AttackSpace:
    """What the simulated attacker may do; one attack is drawn from it per outer step."""

    optimizers: tuple[tuple[str, float], ...] = (("sgd", 1e-2), ("sgd", 1e-3), ("sgd", 1e-4),
                                                 ("adam", 1e-4), ("adam", 5e-5))
    batch_sizes: tuple[int, int] = (4, 30)  # inclusive range
    inner_steps: tuple[int, int] = (5, 40)
    kinds: tuple[str, ...] = ("image", "feature")
    params: tuple[str, ...] = ("full", "lora")
    lora_rank: int = 4
    queries_per_attack: int = 3  # query loss taken this many times along each trajectory


@dataclass(frozen=True)
class SimulatedAttack:
    optimizer: str
    lr: float
    batch_size: int
    steps: int
    kind: str  # "image": reconstruct unsafe images; "feature": restore the original decoding
    params: str  # "full" or "lora"
    lora_rank: int

    def query_steps(self, n: int) -> set[int]:
        """Inner steps (1-based) after which the query loss is taken: evenly spaced, always the last."""
        return {int(round(self.steps * (i + 1) / n)) for i in range(n)} | {self.steps}


def sample_attack(rng: np.random.Generator, space: AttackSpace) -> SimulatedAttack:
    opt, lr = space.optimizers[int(rng.integers(len(space.optimizers)))]
    return SimulatedAttack(
        optimizer=opt, lr=lr,
        batch_size=int(rng.integers(space.batch_sizes[0], space.batch_sizes[1] + 1)),
        steps=int(rng.integers(space.inner_steps[0], space.inner_steps[1] + 1)),
        kind=space.kinds[int(rng.integers(len(space.kinds)))],
        params=space.params[int(rng.integers(len(space.params)))],
        lora_rank=space.lora_rank,
    )


def make_optimizer(name: str, lr: float, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown attack optimizer {name!r}")


class _LoRAView:
    """Low-rank updates W + B @ A on every conv/linear weight, applied functionally."""

    def __init__(self, base: Params, rank: int, generator: torch.Generator):
        self.base = base
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, w in base.items():
            if name.endswith("weight") and w.dim() in (2, 4):
                out_dim, in_dim = w.shape[0], w[0].numel()
                r = min(rank, out_dim, in_dim)
                # Drawn on the CPU generator, so the attack is the same whatever device `w` is on.
                a = (torch.randn(r, in_dim, generator=generator) / in_dim ** 0.5).to(w).requires_grad_(True)
                b = torch.zeros(out_dim, r, dtype=w.dtype, device=w.device, requires_grad=True)  # identity, like peft
                self.factors[name] = (a, b)

    def parameters(self) -> list[torch.Tensor]:
        return [t for ab in self.factors.values() for t in ab]

    def effective(self) -> Params:
        out = dict(self.base)
        for name, (a, b) in self.factors.items():
            out[name] = self.base[name] + (b @ a).view_as(self.base[name])
        return out


def inner_loss(head: torch.nn.Module, params: Params, attack: SimulatedAttack, data: dict[str, torch.Tensor],
               idx: torch.Tensor) -> torch.Tensor:
    """The attacker's objective on one batch."""
    if attack.kind == "image":
        return F.mse_loss(functional_call(head, params, (data["z_img"][idx],)), data["x"][idx])
    return F.mse_loss(functional_call(head, params, (data["z_gen"][idx],)), data["orig_decoded"][idx])


def simulate_first_order(
    head: torch.nn.Module,
    attack: SimulatedAttack,
    data: dict[str, torch.Tensor],
    query_loss: Callable[[torch.nn.Module, Params], torch.Tensor],
    queries: int,
    generator: torch.Generator,
) -> tuple[Params, float]:
    """Play `attack` on a copy of `head`'s parameters; return the mean query gradient and loss.

    `data` holds the attacker's unsafe training data: `x` (images), `z_img` (their encoder
    latents), `z_gen` (UNet latents) and `orig_decoded` (the original decoder's output for
    `z_gen`). The returned gradient is w.r.t. the *adapted* parameters (first-order MAML).
    """
    base = {n: p.detach() for n, p in head.named_parameters()}
    if attack.params == "full":
        fast = {n: p.clone().requires_grad_(True) for n, p in base.items()}
        trainable, effective = list(fast.values()), lambda: fast
    else:
        lora = _LoRAView(base, attack.lora_rank, generator)
        trainable, effective = lora.parameters(), lora.effective
    opt = make_optimizer(attack.optimizer, attack.lr, trainable)
    n = len(data["x"])
    grads = {k: torch.zeros_like(v) for k, v in base.items()}
    losses = []
    for step in range(1, attack.steps + 1):
        idx = torch.randint(0, n, (attack.batch_size,), generator=generator)
        loss = inner_loss(head, effective(), attack, data, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in attack.query_steps(queries):
            adapted = {k: v.detach().requires_grad_(True) for k, v in effective().items()}
            q = query_loss(head, adapted)
            for (k, v), g in zip(adapted.items(), torch.autograd.grad(q, list(adapted.values()))):
                grads[k] += g
            losses.append(q.item())
    n_q = len(losses)
    return {k: g / n_q for k, g in grads.items()}, float(np.mean(losses))


def simulate_second_order(
    head: torch.nn.Module,
    attack: SimulatedAttack,
    data: dict[str, torch.Tensor],
    query_loss: Callable[[torch.nn.Module, Params], torch.Tensor],
    generator: torch.Generator,
) -> torch.Tensor:
    """Full MAML for plain-SGD full-parameter attacks: the query loss at the end of the
    trajectory, differentiable w.r.t. `head`'s own parameters (call `.backward()` on it)."""
    fast = dict(head.named_parameters())
    n = len(data["x"])
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(attack.steps):
            idx = torch.randint(0, n, (attack.batch_size,), generator=generator)
            loss = inner_loss(head, fast, attack, data, idx)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: w - attack.lr * g for (k, w), g in zip(fast.items(), grads)}
        return query_loss(head, fast)
