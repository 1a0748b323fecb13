"""What the simulated attacker may do, and one attack drawn from it per outer step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patronus.errors import ConfigError
from patronus.training import OPTIMIZERS

UPDATES = ("full", "lora")


@dataclass(frozen=True)
class AttackSpaceConfig:
    """The distribution of simulated attacks; one is drawn per outer NFT step."""

    optimizers: tuple[tuple[str, float], ...] = (("sgd", 1e-2), ("sgd", 1e-3), ("sgd", 1e-4),
                                                 ("adam", 1e-4), ("adam", 5e-5))
    batch_sizes: tuple[int, int] = (4, 30)  # inclusive range
    inner_steps: tuple[int, int] = (5, 40)
    # What the attacker optimises; the defence that runs NFT says what each name means.
    objectives: tuple[str, ...] = ("image", "feature")
    updates: tuple[str, ...] = UPDATES  # full weights, or a LoRA on every conv/linear weight
    lora_rank: int = 4
    queries_per_attack: int = 3  # query loss taken this many times along each trajectory

    def __post_init__(self):
        if not self.optimizers or any(len(o) != 2 or o[0] not in OPTIMIZERS or not o[1] > 0 for o in self.optimizers):
            raise ConfigError(f"attacks.optimizers must be [name, lr] pairs with a name from {', '.join(OPTIMIZERS)} "
                              f"and lr > 0, got {self.optimizers!r}")
        for name in ("batch_sizes", "inner_steps"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ConfigError(f"attacks.{name} must be [low, high] with 1 <= low <= high, got {[lo, hi]}")
        if not self.objectives:
            raise ConfigError("attacks.objectives must name at least one objective")
        if not self.updates or set(self.updates) - set(UPDATES):
            raise ConfigError(f"attacks.updates must be drawn from {', '.join(UPDATES)}, got {self.updates!r}")
        if self.lora_rank < 1 or self.queries_per_attack < 1:
            raise ConfigError("attacks.lora_rank and attacks.queries_per_attack must be at least 1")


@dataclass(frozen=True)
class SimulatedAttack:
    optimizer: str
    lr: float
    batch_size: int
    steps: int
    objective: str  # what the attacker minimises (its meaning is the defence's)
    update: str  # "full" or "lora"
    lora_rank: int

    def query_steps(self, n: int) -> set[int]:
        """Inner steps (1-based) after which the query loss is taken: evenly spaced, always the last."""
        return {int(round(self.steps * (i + 1) / n)) for i in range(n)} | {self.steps}


def sample_attack(rng: np.random.Generator, space: AttackSpaceConfig) -> SimulatedAttack:
    opt, lr = space.optimizers[int(rng.integers(len(space.optimizers)))]
    return SimulatedAttack(
        optimizer=opt, lr=lr,
        batch_size=int(rng.integers(space.batch_sizes[0], space.batch_sizes[1] + 1)),
        steps=int(rng.integers(space.inner_steps[0], space.inner_steps[1] + 1)),
        objective=space.objectives[int(rng.integers(len(space.objectives)))],
        update=space.updates[int(rng.integers(len(space.updates)))],
        lora_rank=space.lora_rank,
    )
