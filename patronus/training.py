"""Pieces every training loop here shares: seeded per-step randomness, optimizers, checkpoints.

Randomness is drawn from a generator seeded by (run seed, step), never from a stream that
carries over between steps, so a run resumed from a checkpoint computes exactly what the
uninterrupted run did. The optimizer names are the threat model's; the defender's simulated
attacker and the real attacks build theirs here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from patronus.errors import ConfigError, WriteError
from patronus.io import DISK_ERRNOS

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adadelta")
# Learning-rate schedules of the real attacks: "constant", or "step": x0.1 at 25%, 50% and 75% of
# the run's steps (MultiStepLR), as the Patronus paper's reference attacks run.
SCHEDULES = ("constant", "step")
STEP_DECAY_AT = (0.25, 0.5, 0.75)
STEP_DECAY = 0.1


def check_max_grad_norm(value: float | None, name: str) -> None:
    """A gradient-clipping norm is unset (no clipping) or a positive finite number; `name` is how
    the user wrote the setting, for the error."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not (math.isfinite(value) and value > 0)):
        raise ConfigError(f"{name} must be a positive finite number (diffusers' scripts use 1.0), got {value!r}")


def mix_seed(seed: int, offset: int) -> int:
    """One integer seed per (run seed, step or item): far apart for different run seeds."""
    return seed * 1_000_003 + offset


def step_generator(seed: int, offset: int) -> torch.Generator:
    """A CPU generator for one step (or item), the same wherever the run is resumed."""
    return torch.Generator().manual_seed(mix_seed(seed, offset))


@contextmanager
def capture_outputs(modules: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """The outputs of `modules` during the forward passes inside the block, in call order
    (representation scrambling's activations, in both halves)."""
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: acts.append(o)) for m in modules]
    try:
        yield acts
    finally:
        for h in hooks:
            h.remove()


def make_optimizer(name: str, lr: float, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizers the threat model lists, with the momentum settings the reference uses."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def step_milestones(total_steps: int) -> list[int]:
    """The steps after which the "step" schedule multiplies the learning rate by STEP_DECAY."""
    return [m for m in (int(total_steps * f) for f in STEP_DECAY_AT) if m >= 1]


def make_lr_schedule(name: str, opt: torch.optim.Optimizer,
                     total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The attack's learning-rate schedule over `total_steps` optimizer steps; call its `step()`
    after each `opt.step()`. None for "constant": the optimizer is left exactly as it was built."""
    if name == "constant":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=step_milestones(total_steps), gamma=STEP_DECAY)
    raise ConfigError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


@torch.no_grad()
def check_replicas_agree(accelerator: Accelerator, module: torch.nn.Module, what: str) -> None:
    """Under several processes, the trained weights must be bit-identical on every one (DDP
    averages every gradient, the NFT term's included); a difference means a gradient escaped
    synchronisation, and the run stops rather than save one process's weights."""
    if accelerator.num_processes == 1:
        return
    params = [p.detach().double() for p in module.parameters()]
    digest = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    every = accelerator.gather(digest[None].to(accelerator.device))
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError(f"{what}'s weights differ between processes after training: a gradient was not "
                           "synchronised; this is a bug")


class Checkpointer:
    """`checkpoint-{tag}` directories in one folder: accelerate's state (models as safetensors;
    optimizers and RNG states as torch pickles, which accelerate reads back with
    `weights_only=True`), `schedulers` as JSON, the loop's own `state.json` and optional
    tensors, each written to a temporary directory and renamed, so a kill never leaves a
    half-written checkpoint. The newest `keep` are kept. Schedulers go to JSON rather than
    through `register_for_checkpointing`, whose files accelerate unpickles with
    `weights_only=False`."""

    STATE, TENSORS, SCHEDULERS = "state.json", "tensors.safetensors", "schedulers.json"

    def __init__(self, accelerator: Accelerator, folder: Path, keep: int = 2, schedulers: tuple = ()):
        self.accelerator, self.folder, self.keep, self.schedulers = accelerator, Path(folder), keep, schedulers

    def all(self) -> list[Path]:
        return sorted(self.folder.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))

    def save(self, tag: int, state: dict, tensors: dict[str, torch.Tensor] | None = None,
             files: dict[str, Path] | None = None) -> Path:
        """Every process calls this (accelerate saves each process's RNG state); the main one writes
        the rest, and links (or copies) `files` in under their names."""
        acc = self.accelerator
        tmp = self.folder / f"tmp-checkpoint-{tag}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        final = self.folder / f"checkpoint-{tag}"
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                (tmp / self.STATE).write_text(json.dumps(state, indent=2))
                if self.schedulers:
                    (tmp / self.SCHEDULERS).write_text(json.dumps([s.state_dict() for s in self.schedulers]))
                if tensors:
                    save_file(tensors, tmp / self.TENSORS)
                for name, src in (files or {}).items():
                    _replace_with_link(src, tmp / name)
        except OSError as e:  # the older checkpoints are untouched
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in DISK_ERRNOS:
                raise
            previous = self.all()
            raise WriteError(f"cannot write checkpoint {final} ({e.strerror or e}); "
                             + (f"{previous[-1]} is intact: free space and rerun with --resume" if previous
                                else "no earlier checkpoint: free space and rerun")) from e
        # accelerate writes each process's RNG state last, with no barrier of its own: renaming
        # before the slowest process has written would lose its file or fail its write.
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp.rename(final)
            for old in self.all()[:-self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _migrate(self, ckpt: Path) -> None:
        """Checkpoints written before schedulers went to JSON hold them as accelerate's custom
        pickles, which accelerate would unpickle unrestricted (and refuses to load when nothing is
        registered). A scheduler's state is plain numbers: read it with the restricted unpickler,
        keep it as JSON, drop the pickles."""
        pickles = sorted(ckpt.glob("custom_checkpoint_*.pkl"))
        if (not self.schedulers or len(pickles) != len(self.schedulers) or (ckpt / self.SCHEDULERS).exists()
                or not self.accelerator.is_main_process):  # e.g. train-base's registered EMA models stay
            return
        states = [torch.load(f, weights_only=True) for f in pickles]
        (ckpt / self.SCHEDULERS).write_text(json.dumps(states))
        for f in pickles:
            f.unlink()

    def restore(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """Load the newest checkpoint into the accelerator's objects; its state and tensors, or None."""
        ckpts = self.all()
        if not ckpts:
            return None
        self._migrate(ckpts[-1])
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(ckpts[-1]))
        if self.schedulers:
            for sched, saved in zip(self.schedulers, json.loads((ckpts[-1] / self.SCHEDULERS).read_text())):
                sched.load_state_dict(saved)
        tensors = load_file(ckpts[-1] / self.TENSORS) if (ckpts[-1] / self.TENSORS).exists() else {}
        state = json.loads((ckpts[-1] / self.STATE).read_text())
        self.accelerator.print(f"resumed from {ckpts[-1]}")
        return state, tensors


EXTRA = "extra/"  # RunState.extra's prefix in a checkpoint's tensors; weight names hold no "/"


class RunState:
    """Where a probed training run is (stage, step), its probes, and the best checkpoint's
    weights so far; saved with every checkpoint so that a resumed run ends exactly where an
    unbroken one does. Probes are ranked by the keys in `rank_by`, compared in order; two probes
    that both fail the gate (`feasible` false) by `infeasible_rank_by` when given, so that a run
    where no checkpoint passes keeps the one nearest to passing rather than the best-scored (a
    broken model leaves a probe attacker little to flag, which scores well). With
    `best_on_disk` the best weights wait in `BEST` in the checkpoint folder (each checkpoint
    links to its version) instead of in CPU memory: a UNet's worth less at SD-1.5 widths."""

    BEST = "best.safetensors"

    def __init__(self, checkpointer: Checkpointer, rank_by: tuple[str, ...] = ("feasible", "score", "benign_psnr"),
                 best_on_disk: bool = False, infeasible_rank_by: tuple[str, ...] | None = None):
        self.checkpointer, self.rank_by, self.best_on_disk = checkpointer, rank_by, best_on_disk
        self.infeasible_rank_by = infeasible_rank_by
        self.state: dict = {"stage": 1, "step": 0, "probes": [], "best": None, "timing": {}, "losses": {}}
        self._best: dict[str, torch.Tensor] = {}  # in memory, without `best_on_disk`
        self.extra: dict[str, torch.Tensor] = {}  # other tensors the loop resumes from (kept as "extra/NAME")
        self._since = time.time()

    @property
    def _best_file(self) -> Path:
        return self.checkpointer.folder / self.BEST

    def best_weights(self) -> dict[str, torch.Tensor]:
        """The best checkpoint's weights (on the CPU), for `load_state_dict` at the end of a run."""
        return load_file(self._best_file) if self.best_on_disk else self._best

    def restore(self) -> None:
        restored = self.checkpointer.restore()
        if restored is not None:
            self.state, tensors = restored
            self._best = {k: v for k, v in tensors.items() if not k.startswith(EXTRA)}
            device = self.checkpointer.accelerator.device  # load_file reads onto the CPU
            self.extra = {k.removeprefix(EXTRA): v.to(device) for k, v in tensors.items() if k.startswith(EXTRA)}
            saved = self.checkpointer.all()[-1] / self.BEST
            if self.best_on_disk and self.checkpointer.accelerator.is_main_process:
                if saved.exists():
                    _replace_with_link(saved, self._best_file)
                else:  # a probe after the checkpoint; the resumed run plays it again
                    self._best_file.unlink(missing_ok=True)
        self._since = time.time()

    def worked_seconds(self) -> float:
        """Seconds spent on this run over every session: a resumed run adds its own time to what
        its checkpoint recorded, so a run's cost does not shrink to its last session's."""
        return self.state["timing"].get("worked_seconds", 0.0) + time.time() - self._since

    def log(self, stage: int, loss: torch.Tensor) -> None:
        """The step's total loss, averaged over processes (the loss curve patronus.json keeps)."""
        mean = self.checkpointer.accelerator.reduce(loss.detach(), reduction="mean")
        self.state["losses"].setdefault(f"stage{stage}", []).append(float(mean))

    def save(self) -> None:
        self.state["timing"]["worked_seconds"] = self.worked_seconds()
        self._since = time.time()
        tensors = self._best | {EXTRA + k: v.contiguous() for k, v in self.extra.items()}
        files = {self.BEST: self._best_file} if self.best_on_disk and self._best_file.exists() else {}
        self.checkpointer.save(self.state["stage"] * 1_000_000 + self.state["step"], self.state, tensors, files)

    def _rank(self, result: dict) -> tuple:
        if self.infeasible_rank_by is not None and not result["feasible"]:
            return (False, *(result[k] for k in self.infeasible_rank_by))
        return tuple(result[k] for k in self.rank_by)

    def record_probe(self, result: dict, model: torch.nn.Module) -> None:
        """Keep the probe; keep `model`'s weights when it is the best checkpoint so far (for the
        decoder: benign PSNR above the bar first, then the highest probe score, then PSNR)."""
        self.state["probes"].append(result)
        best = self.state["best"]
        if best is None or self._rank(result) > self._rank(best):
            self.state["best"] = result
            if not self.best_on_disk:
                # On the CPU: on a GPU a UNet-sized copy would sit beside the training state until the end.
                self._best = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
            else:
                acc = self.checkpointer.accelerator
                if acc.is_main_process:
                    self._best_file.parent.mkdir(parents=True, exist_ok=True)  # a probe can come before any checkpoint
                    tmp = self._best_file.with_suffix(".tmp")
                    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp)
                    tmp.replace(self._best_file)  # a new file: the checkpoints' links keep the old one
                acc.wait_for_everyone()


def _replace_with_link(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content: a hard link (no copy of a UNet's weights), or a copy where
    the file system has none."""
    tmp = dst.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)
