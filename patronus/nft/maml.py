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

Two memory features need care with weights passed to `functional_call`, and get it here:
- gradient checkpointing recomputes a block in the backward pass, after `functional_call` has
  put the module's own weights back; each checkpointed block is made to recompute with the
  weights its forward pass used (`checkpoints_follow_the_call`);
- mixed precision (autocast) caches its 16-bit copy of a weight for as long as the autocast
  region lasts, and the optimizer updates the attacker's weights in place; the cache is
  cleared after every inner step, or every step would run on the starting weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

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


def _recompute_with_call_weights(block: torch.nn.Module, *args):
    """diffusers' checkpointing function, recomputing `block` with the weights it is called with
    now (under `functional_call`, the simulated attacker's), not the ones it holds later."""
    weights = dict(block.named_parameters())
    return checkpoint(lambda *a: functional_call(block, weights, a), *args, use_reentrant=False)


@contextlib.contextmanager
def checkpoints_follow_the_call(module: torch.nn.Module) -> Iterator[None]:
    """While it lasts, the checkpointed blocks of `module` (diffusers' `enable_gradient_checkpointing`)
    recompute with the weights `functional_call` passed them."""
    blocks = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)
              and getattr(m, "_gradient_checkpointing_func", None) is not None]
    saved = [m._gradient_checkpointing_func for m in blocks]
    for m in blocks:
        m._gradient_checkpointing_func = _recompute_with_call_weights
    try:
        yield
    finally:
        for m, func in zip(blocks, saved):
            m._gradient_checkpointing_func = func


def _accumulate_gradient(loss: torch.Tensor, params: Params, into: Params, weight: float) -> None:
    """`into[k] += weight * d loss / d params[k]`, each parameter's gradient added and freed as the
    backward pass produces it: one parameter's gradient alive at a time instead of a model's worth
    (3.2 GiB at SD-1.5 widths). The same numbers as `torch.autograd.grad` and a loop."""
    done: set[str] = set()

    def add(p: torch.Tensor, k: str) -> None:
        into[k] += weight * p.grad
        p.grad = None
        done.add(k)

    hooks = [p.register_post_accumulate_grad_hook(lambda p, k=k: add(p, k)) for k, p in params.items()]
    try:
        torch.autograd.backward(loss, inputs=list(params.values()))
    finally:
        for h in hooks:
            h.remove()
    if missing := set(params) - done:  # as torch.autograd.grad refuses an unused input
        raise RuntimeError(f"the query loss does not depend on {len(missing)} parameters, e.g. {min(missing)}")


def simulate_first_order(module: torch.nn.Module, attack: SimulatedAttack, inner_loss: InnerLoss,
                         query_loss: QueryLoss, queries: int, generator: torch.Generator,
                         weighting: str = "uniform", lora_targets: tuple[str, ...] | None = None,
                         offset: Params | None = None, implicit: tuple[float, int] | None = None
                         ) -> tuple[Params, float]:
    """Play `attack` on a copy of `module`'s parameters; return the weighted query gradient and loss.

    The returned gradient is w.r.t. the *adapted* parameters (first-order MAML), keyed like
    `module.named_parameters()`; `weighting` spreads the queries' weights (see `query_weights`);
    `lora_targets` are the modules a LoRA attack adapts (None: every conv and linear layer).
    `offset` (per parameter) moves the attack's starting point away from the module's weights;
    the gradient is still applied to the module's own weights, as first-order MAML applies it.
    `implicit` = (alpha, iterations) passes each query gradient through `implicit_gradient`.
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
    with checkpoints_follow_the_call(module):
        for step in range(1, attack.steps + 1):
            loss = inner_loss(effective(), generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if attack.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, attack.max_grad_norm)
            opt.step()
            torch.clear_autocast_cache()  # the next step's 16-bit weights are the updated ones
            if step in weight:
                adapted = {k: v.detach().requires_grad_(True) for k, v in effective().items()}
                q = query_loss(adapted)
                if implicit:
                    qg = dict(zip(adapted, torch.autograd.grad(q, list(adapted.values()))))
                    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
                    qg, _ = implicit_gradient(qg, adapted, inner_loss, seed, *implicit)
                    for k, g in qg.items():
                        grads[k] += weight[step] * g
                else:
                    _accumulate_gradient(q, adapted, grads, weight[step])
                torch.clear_autocast_cache()  # nor keep the query's copies for the rest of the step
                loss_sum += weight[step] * q.item()
    return grads, loss_sum


def implicit_gradient(grads: Params, adapted: Params, inner_loss: InnerLoss, batch_seed: int, alpha: float,
                      iterations: int, power_iterations: int = 3) -> tuple[Params, float]:
    """(I + alpha H)^-1 g, with H the Hessian of the attacker's loss at the adapted parameters.

    ResAlign (Li et al., 2025) models the fine-tune as the proximal step
    argmin_p L_att(p) + |p - w|^2 / (2 alpha). By the implicit function theorem its end point
    moves with the weights w as (I + alpha H)^-1, where first-order MAML assumes the identity:
    directions in which the attacker's loss curves steeply upward are damped, because there the
    fine-tune ends in the same place wherever it starts (downward curvature amplifies, and
    1 + alpha lam <= 0 has no solution). Solved by Richardson iterations
    v <- v + (g - v - alpha H v) / (1 + alpha |lam|), lam H's eigenvalue of largest magnitude
    (power iteration), with Hessian-vector products on one attacker batch drawn from `batch_seed`.
    Returns the corrected gradient and lam.
    """
    names = list(adapted)
    params = [adapted[n].detach().requires_grad_(True) for n in names]
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        loss = inner_loss(dict(zip(names, params)), torch.Generator().manual_seed(batch_seed))
        first = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, f in enumerate(first) if f is not None and f.requires_grad]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.autograd.grad([first[i] for i in used], [params[i] for i in used], [v[i] for i in used],
                                  retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(p) for p in params]
        for i, h in zip(used, out):
            if h is not None:
                hv[i] = h
        return hv

    def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return sum((x * y).sum() for x, y in zip(a, b))

    g = [grads[n].detach() for n in names]
    u = [x / dot(g, g).sqrt().clamp_min(1e-30) for x in g]
    lam = 0.0
    for _ in range(power_iterations):
        hu = hvp(u)
        lam = float(dot(u, hu))
        u = [x / dot(hu, hu).sqrt().clamp_min(1e-30) for x in hu]
    step = 1.0 / (1.0 + alpha * abs(lam))
    v = list(g)
    for _ in range(iterations):
        hv = hvp(v)
        v = [x + step * (gi - x - alpha * h) for x, gi, h in zip(v, g, hv)]
    return dict(zip(names, v)), lam


def simulate_second_order(module: torch.nn.Module, attack: SimulatedAttack, inner_loss: InnerLoss,
                          query_loss: QueryLoss, generator: torch.Generator) -> torch.Tensor:
    """Full MAML for plain-SGD full-parameter attacks: the query loss at the end of the
    trajectory, differentiable w.r.t. `module`'s own parameters (backpropagate through it)."""
    if not second_order_applies(attack):
        raise ValueError(f"second-order MAML needs a full-weight sgd attack, got {attack.optimizer}/{attack.update}")
    fast = dict(module.named_parameters())
    with sdpa_kernel(SDPBackend.MATH), checkpoints_follow_the_call(module):
        for _ in range(attack.steps):
            grads = torch.autograd.grad(inner_loss(fast, generator), list(fast.values()), create_graph=True)
            if attack.max_grad_norm is not None:  # as clip_grad_norm_ scales, but differentiably
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                grads = [g * (attack.max_grad_norm / (norm + 1e-6)).clamp(max=1.0) for g in grads]
            fast = {k: w - attack.lr * g for (k, w), g in zip(fast.items(), grads)}
        return query_loss(fast)


def nft_surrogate(module: torch.nn.Module, nft_grads: Params) -> torch.Tensor:
    """A term whose gradient w.r.t. `module`'s parameters is `nft_grads` (its value means nothing).

    Added to the defender's loss, the first-order MAML gradient goes through the same backward
    as every other term: averaged across processes by DDP, scaled alike under mixed precision.
    """
    return sum((p * nft_grads[n].detach()).sum() for n, p in module.named_parameters())
