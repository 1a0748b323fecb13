"""Simulated fine-tuning attacks and their MAML gradient, for any set of parameters.

Each outer step of non-fine-tunable learning plays one drawn attack on a functional copy of
the defended parameters (`torch.func.functional_call` inside the losses; the module is never
deep-copied) and scores the adapted parameters along the trajectory with the *query loss*.
First-order MAML applies the query gradient taken at the adapted parameters to the original
ones; `nft_surrogate` turns it into a loss term, so it joins the defender's other terms in
one backward pass.

The caller supplies both losses as closures over its module and data:
  inner_loss(params, generator) -> the attacker's loss on a batch it draws from `generator`;
  query_loss(params) -> the defender's score of adapted parameters on held-out data.

The inner loop uses stock `torch.optim` optimizers on detached parameter copies: first-order
MAML needs no gradient through the updates, and the simulated attacker then behaves exactly
like a real one. Second-order MAML (plain SGD only) differentiates through the updates and
needs the math attention kernel, because the fused CPU kernels have no double backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from patronus.nft.lora import LoRAView, Params
from patronus.nft.space import SimulatedAttack
from patronus.training import make_optimizer

InnerLoss = Callable[[Params, torch.Generator], torch.Tensor]
QueryLoss = Callable[[Params], torch.Tensor]


def second_order_applies(attack: SimulatedAttack) -> bool:
    """Second-order MAML differentiates plain gradient steps on full weights only."""
    return attack.optimizer == "sgd" and attack.update == "full"


def query_weights(n: int, weighting: str = "late") -> list[float]:
    """Weights of the n queries along a trajectory: equal, or growing with the step ("late"),
    since what the attacker reaches at the end is what the defence is judged by."""
    raw = [float(i + 1) if weighting == "late" else 1.0 for i in range(n)]
    return [w / sum(raw) for w in raw]


def simulate_first_order(module: torch.nn.Module, attack: SimulatedAttack, inner_loss: InnerLoss,
                         query_loss: QueryLoss, queries: int, generator: torch.Generator,
                         weighting: str = "uniform", lora_targets: tuple[str, ...] | None = None,
                         offset: Params | None = None) -> tuple[Params, float]:
    """Play `attack` on a copy of `module`'s parameters; return the weighted query gradient and loss.

    The returned gradient is w.r.t. the *adapted* parameters (first-order MAML), keyed like
    `module.named_parameters()`; `weighting` spreads the queries' weights (see `query_weights`);
    `lora_targets` are the modules a LoRA attack adapts (None: every conv and linear layer).
    `offset` (per parameter) moves the attack's starting point away from the module's weights;
    the gradient is still applied to the module's own weights, as first-order MAML applies it.
    """
    base = {n: p.detach() + offset[n] if offset else p.detach() for n, p in module.named_parameters()}
    if attack.update == "full":
        fast = {n: p.clone().requires_grad_(True) for n, p in base.items()}
        trainable, effective = list(fast.values()), lambda: fast
    else:
        lora = LoRAView(base, attack.lora_rank, generator, lora_targets)
        trainable, effective = lora.parameters(), lora.effective
    opt = make_optimizer(attack.optimizer, attack.lr, trainable)
    at = attack.query_steps(queries)
    weight = dict(zip(at, query_weights(len(at), weighting)))
    grads = {k: torch.zeros_like(v) for k, v in base.items()}
    loss_sum = 0.0
    for step in range(1, attack.steps + 1):
        loss = inner_loss(effective(), generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in weight:
            adapted = {k: v.detach().requires_grad_(True) for k, v in effective().items()}
            q = query_loss(adapted)
            for (k, v), g in zip(adapted.items(), torch.autograd.grad(q, list(adapted.values()))):
                grads[k] += weight[step] * g
            loss_sum += weight[step] * q.item()
    return grads, loss_sum


def simulate_second_order(module: torch.nn.Module, attack: SimulatedAttack, inner_loss: InnerLoss,
                          query_loss: QueryLoss, generator: torch.Generator) -> torch.Tensor:
    """Full MAML for plain-SGD full-parameter attacks: the query loss at the end of the
    trajectory, differentiable w.r.t. `module`'s own parameters (backpropagate through it)."""
    if not second_order_applies(attack):
        raise ValueError(f"second-order MAML needs a full-weight sgd attack, got {attack.optimizer}/{attack.update}")
    fast = dict(module.named_parameters())
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(attack.steps):
            grads = torch.autograd.grad(inner_loss(fast, generator), list(fast.values()), create_graph=True)
            fast = {k: w - attack.lr * g for (k, w), g in zip(fast.items(), grads)}
        return query_loss(fast)


def nft_surrogate(module: torch.nn.Module, nft_grads: Params) -> torch.Tensor:
    """A term whose gradient w.r.t. `module`'s parameters is `nft_grads` (its value means nothing).

    Added to the defender's loss, the first-order MAML gradient goes through the same backward
    as every other term: averaged across processes by DDP, scaled alike under mixed precision.
    """
    return sum((p * nft_grads[n].detach()).sum() for n, p in module.named_parameters())
