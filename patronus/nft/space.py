"""What the simulated attacker may do, and one attack drawn from it per outer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from patronus.errors import ConfigError
from patronus.training import OPTIMIZERS, check_max_grad_norm

UPDATES = ("full", "lora")


def _weighted(name: str, pairs: tuple, allowed: tuple[str, ...] | None = None) -> None:
    """`pairs` (the setting `name`) must be non-empty (choice, probability weight) pairs with positive weights."""
    if (not pairs or any(len(p) != 2 or not isinstance(p[0], str) or not p[1] > 0 for p in pairs)
            or (allowed is not None and any(p[0] not in allowed for p in pairs))):
        choices = f" with a choice from {', '.join(allowed)}" if allowed else ""
        raise ConfigError(f"{name} must be [choice, weight] pairs{choices} and weight > 0, got {pairs!r}")


@dataclass(frozen=True)
class AttackSpaceConfig:
    """The distribution of simulated attacks; one is drawn per outer NFT step.

    It is meant to cover the real attack grid: mostly full-weight Adam/AdamW (the attacker
    that moves every weight by about lr per step whatever the gradient), lr log-uniform over
    the grid's range, horizons that reach its first checkpoint (100 steps), LoRA at the
    sweep's ranks, each attack with a fresh optimizer.
    """

    optimizers: tuple[tuple[str, float], ...] = (("adam", 0.5), ("adamw", 0.2), ("sgd", 0.3))  # (name, weight)
    lr_range: tuple[float, float] = (1e-5, 1e-3)  # drawn log-uniformly
    batch_sizes: tuple[int, int] = (8, 32)  # inclusive range
    inner_steps: tuple[int, int] = (10, 100)
    # What the attacker optimises, with weights; the defence that runs NFT says what each name means.
    objectives: tuple[tuple[str, float], ...] = (("image", 0.8), ("feature", 0.2))
    updates: tuple[tuple[str, float], ...] = (("full", 0.8), ("lora", 0.2))  # full weights or a LoRA
    lora_ranks: tuple[int, ...] = (4, 64)  # the sweep's ranks, parametrised as peft does
    queries_per_attack: int = 3  # query loss taken this many times along each trajectory
    query_weighting: str = "late"  # "late": the i-th of n queries weighs i / (1 + ... + n); or "uniform"
    # Every simulated attacker clips its gradient's norm to this before each step (None: never), as
    # the real attacker does with `--max-grad-norm`: an unclipped one is slowed by the large first
    # gradients a refusal gives it, so NFT against it learns that damping (docs/concepts/threat-model.md).
    max_grad_norm: float | None = None

    # The table these settings are read from, for errors: `[attacks]`, or `[unet.attacks]` in the subclass.
    TABLE: ClassVar[str] = "attacks"

    def __post_init__(self):
        t = self.TABLE
        _weighted(f"{t}.optimizers", self.optimizers, OPTIMIZERS)
        _weighted(f"{t}.objectives", self.objectives)
        _weighted(f"{t}.updates", self.updates, UPDATES)
        lo, hi = self.lr_range
        if not 0 < lo <= hi:
            raise ConfigError(f"{t}.lr_range must be [low, high] with 0 < low <= high, got {[lo, hi]}")
        for name in ("batch_sizes", "inner_steps"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ConfigError(f"{t}.{name} must be [low, high] with 1 <= low <= high, got {[lo, hi]}")
        if not self.lora_ranks or min(self.lora_ranks) < 1 or self.queries_per_attack < 1:
            raise ConfigError(f"{t}.lora_ranks and {t}.queries_per_attack must be at least 1")
        if self.query_weighting not in ("late", "uniform"):
            raise ConfigError(f"{t}.query_weighting must be late or uniform, got {self.query_weighting!r}")
        check_max_grad_norm(self.max_grad_norm, f"{t}.max_grad_norm")


@dataclass(frozen=True)
class SimulatedAttack:
    optimizer: str
    lr: float
    batch_size: int
    steps: int
    objective: str  # what the attacker minimises (its meaning is the defence's)
    update: str  # "full" or "lora"
    lora_rank: int
    max_grad_norm: float | None = None  # the gradient's norm is clipped to this before each step

    def query_steps(self, n: int) -> list[int]:
        """Inner steps (1-based) after which the query loss is taken: evenly spaced, always the last."""
        return sorted({int(round(self.steps * (i + 1) / n)) for i in range(n)} | {self.steps})


def _pick(rng: np.random.Generator, pairs: tuple[tuple[str, float], ...]) -> str:
    weights = np.array([w for _, w in pairs], dtype=float)
    return pairs[int(rng.choice(len(pairs), p=weights / weights.sum()))][0]


def sample_attack(rng: np.random.Generator, space: AttackSpaceConfig) -> SimulatedAttack:
    lo, hi = np.log(space.lr_range[0]), np.log(space.lr_range[1])
    return SimulatedAttack(
        optimizer=_pick(rng, space.optimizers),
        lr=float(np.exp(rng.uniform(lo, hi))),
        batch_size=int(rng.integers(space.batch_sizes[0], space.batch_sizes[1] + 1)),
        steps=int(rng.integers(space.inner_steps[0], space.inner_steps[1] + 1)),
        objective=_pick(rng, space.objectives),
        update=_pick(rng, space.updates),
        lora_rank=int(space.lora_ranks[int(rng.integers(len(space.lora_ranks)))]),
        max_grad_norm=space.max_grad_norm,
    )
