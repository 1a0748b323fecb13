"""Predicted peak GPU memory of `patronus protect`, an attack and an evaluation on an SD-1.5-shaped
pipeline, per phase: the estimate behind docs/reference/memory.md.

Method. Weights: the parameter count of each module x 4 bytes (every copy is float32, as
`load_pipeline` loads it), one term per copy that a phase holds (the frozen original, the
teacher, the trained module, its gradients, Adam's two moments, the simulated attacker's copy,
...). Activations: the bytes a forward pass saves for its backward pass, per image, counted on
the real diffusers modules built with fake tensors (no memory is allocated, so SD 1.5's
widths cost nothing). Attention is counted as the fused kernels a GPU uses keep it (queries,
keys, values, output and log-sum-exp, never the N x N matrix). Mixed precision follows
torch's CUDA autocast rules (convolutions, linear layers, matmuls and attention in bf16;
group norm, layer norm, softmax and MSE in float32), plus autocast's bf16 copy of each
trained weight. Gradient checkpointing keeps each checkpointed block's inputs, plus one
block's activations while it is recomputed. Forward passes without gradients (sampling, the
decoder's batches of 256) count their largest set of tensors alive at once.

Phases are read from a protect config (a .toml as `patronus protect --config` takes it), so a
memory preset's prediction is made from the same file the run uses.

    python benchmarks/memory_plan.py examples/sd15/memory-24gb.toml --precision bf16
    python benchmarks/memory_plan.py --benchmark-row    # the GPU benchmark's 256 px row, measured at 99 GB
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patronus.attacks.weights.unet import UNET_LORA_TARGETS  # noqa: E402
from patronus.config import build, merge  # noqa: E402
from patronus.defenses.patronus.align import ALIGN_LORA_TARGETS  # noqa: E402
from patronus.defenses.patronus.config import BOTH_PARTS, PRESETS, ProtectConfig, load_config  # noqa: E402
from patronus.defenses.patronus.losses import VGGPerceptual  # noqa: E402
from patronus.models.components import DecoderHead  # noqa: E402
from patronus.models.sd15 import CLIP_VIT_L14_TEXT, SDShapedConfig, build_unet, build_vae  # noqa: E402

GIB = 2**30
F32 = 4
LOWER = {torch.conv2d, F.conv2d, F.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, torch.mm}
FLOAT32 = {F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm, F.softmax, torch.softmax, F.mse_loss}


# --- counting ------------------------------------------------------------------------------------

class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for its backward: q, k, v, the output and the
    log-sum-exp per query (shapes only: the tensors are fake)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class _Autocast(TorchFunctionMode):
    """torch's CUDA autocast to `dtype`, which a CPU build cannot run on fake CUDA tensors. The
    casts of trained weights (autocast's per-step cache) are remembered, to be counted apart."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype, self.weight_casts, self.keep = dtype, set(), []

    def cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            out = value.to(dtype)
            if value.requires_grad and value.is_leaf and torch.is_grad_enabled():
                self.weight_casts.add(out.untyped_storage()._cdata)
                self.keep.append(out)  # alive, so that no later tensor reuses its storage's address
            return out
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None and func in LOWER | FLOAT32:
            dtype = self.dtype if func in LOWER else torch.float32
            args, kwargs = self.cast(args, dtype), {k: self.cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _LiveBytes(TorchDispatchMode):
    """The most bytes of op outputs alive at once (a forward pass without gradients)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _drop(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.now += self.live[key][0]
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._drop, key)
        return out


@contextlib.contextmanager
def _fused_attention(autocast: _Autocast) -> Iterator[None]:
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if autocast.dtype is not None:
            q, k, v = (autocast.cast(x, autocast.dtype) for x in (q, k, v))
        return _FlashAttention.apply(q, k, v)

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes(module: torch.nn.Module, forward: Callable[[], torch.Tensor], dtype: torch.dtype | None,
                checkpointed: torch.nn.Module | None) -> int:
    """What `forward` (a pass through `module`, whose weights train) keeps for its backward pass.
    With `checkpointed` (the diffusers model whose gradient checkpointing to turn on): what stays
    outside the checkpointed blocks, their inputs, and the largest block while it is recomputed."""
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    autocast = _Autocast(dtype)
    block_inputs: dict[int, int] = {}
    largest = 0
    # Storages are told apart by address: every tensor counted is kept alive until the count is
    # done, or a freed one's address, reused by a later tensor, would merge the two (the count
    # then varied by about 1% from run to run). Fake tensors hold no memory.
    keep: list[torch.Tensor] = []

    def counter(into: dict[int, int]):
        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key not in params and key not in autocast.weight_casts:
                into[key] = t.untyped_storage().nbytes()
                keep.append(t)
            return t
        return pack

    def checkpoint(block: torch.nn.Module, *args):
        nonlocal largest
        for a in args:
            if isinstance(a, torch.Tensor):
                block_inputs[a.untyped_storage()._cdata] = a.untyped_storage().nbytes()
                keep.append(a)
        inside: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(counter(inside), lambda t: t):
            out = block(*args)
        largest = max(largest, sum(inside.values()))
        return out

    if checkpointed is not None:
        checkpointed.enable_gradient_checkpointing(checkpoint)
    outside: dict[int, int] = {}
    try:
        with _fused_attention(autocast), autocast, torch.autograd.graph.saved_tensors_hooks(counter(outside),
                                                                                            lambda t: t):
            forward()
    finally:
        if checkpointed is not None:
            checkpointed.disable_gradient_checkpointing()
    return sum((outside | block_inputs).values()) + largest


def live_peak(forward: Callable[[], object], dtype: torch.dtype | None) -> int:
    """The largest set of tensors alive at once during `forward` (no gradients)."""
    autocast, live = _Autocast(dtype), _LiveBytes()
    with torch.no_grad(), _fused_attention(autocast), autocast, live:
        forward()
    return live.peak


# --- the modules ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Bytes of each module's weights, and of activations per image at one resolution and precision."""

    unet: int
    vae: int
    decoder: int
    text_encoder: int
    vgg: int
    align_lora: int  # the UNet half's rank-64 LoRA alignment: its trainable weights
    attack_lora_base: int  # weights a simulated UNet LoRA attack recomputes as W + BA at every step
    attack_lora_rank1: int  # trainable weights of a rank-1 LoRA on the attacks' targets (the LoRA probe's, per rank)
    unet_train: int  # per image, saved for backward
    unet_train_ckpt: int  # the same with gradient checkpointing (block inputs + one block recomputed)
    decoder_train: int
    decoder_train_ckpt: int
    vgg_train: int  # VGG-19 to relu3_4 on an image that needs a gradient
    unet_forward: int  # per image, without gradients (largest set of tensors alive at once)
    decoder_forward: int
    encoder_forward: int


def _lora_params(module: torch.nn.Module, pattern: str, rank: int) -> int:
    """Trainable weights of a peft LoRA of `rank` on the modules whose name matches `pattern`."""
    total = 0
    for name, m in module.named_modules():
        if re.fullmatch(pattern, name) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            total += rank * (m.weight[0].numel() + m.weight.shape[0])
    return total


def _vgg() -> torch.nn.Sequential:
    """VGG-19 to relu3_4, laid out as the `vgg19` perceptual loss builds it."""
    layers, cin = [], 3
    for v in VGGPerceptual.LAYOUT:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(2))
        else:
            layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU()]
            cin = v
    return torch.nn.Sequential(*layers).requires_grad_(False)


def measure(widths: str, resolution: int, precision: str) -> Sizes:
    """Weights and per-image activations of the SD-1.5-shaped modules, on fake tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cfg = SDShapedConfig(widths=widths, resolution=resolution)
    lat = resolution // 8
    with FakeTensorMode():
        unet, vae, vgg = build_unet(cfg), build_vae(cfg), _vgg()
        text = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT))
        head = DecoderHead(vae)
        weights = {name: sum(p.numel() for p in m.parameters()) * F32
                   for name, m in (("unet", unet), ("vae", vae), ("decoder", head), ("text_encoder", text),
                                   ("vgg", vgg))}
        lora_base = sum(m.weight.numel() for n, m in unet.named_modules()
                        if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in UNET_LORA_TARGETS))
        x, t, h = torch.randn(1, 4, lat, lat), torch.tensor([500]), torch.randn(1, 77, 768)
        image = torch.randn(1, 3, resolution, resolution)
        unet_run = lambda: unet(x, t, h, return_dict=False)[0]  # noqa: E731
        head_run = lambda: head(x)  # noqa: E731
        sizes = {"unet_forward": live_peak(unet_run, dtype), "decoder_forward": live_peak(head_run, dtype),
                 "encoder_forward": live_peak(lambda: vae.encode(image), dtype),
                 "vgg_train": saved_bytes(vgg, lambda: vgg(image.clone().requires_grad_(True)), dtype, None)}
        unet.requires_grad_(True)
        head.requires_grad_(True)
        sizes |= {"unet_train": saved_bytes(unet, unet_run, dtype, None),
                  "decoder_train": saved_bytes(head, head_run, dtype, None),
                  "unet_train_ckpt": saved_bytes(unet, unet_run, dtype, unet),
                  "decoder_train_ckpt": saved_bytes(head, head_run, dtype, vae)}
    return Sizes(**weights, align_lora=_lora_params(unet, ALIGN_LORA_TARGETS, 64) * F32,
                 attack_lora_base=lora_base * F32,
                 attack_lora_rank1=_lora_params(unet, rf".*\.({'|'.join(UNET_LORA_TARGETS)})", 1) * F32, **sizes)


# --- the phases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One moment of a run: what it holds, in bytes, by name."""

    name: str
    parts: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())

    def row(self) -> str:
        biggest = sorted(self.parts.items(), key=lambda kv: -kv[1])[:5]
        return (f"| {self.name} | {self.bytes / GIB:.1f} | "
                + ", ".join(f"{k} {v / GIB:.1f}" for k, v in biggest) + " |")


def _phase(name: str, *held: dict[str, float], **more: float) -> Phase:
    parts: dict[str, float] = {}
    for group in (*held, more):
        parts.update(group)
    return Phase(name, {k.replace("_", " "): int(v) for k, v in parts.items() if v})


# Optimizer state, in copies of the weights it trains (SGD with momentum 0.9, RMSprop without momentum: one).
STATE_COPIES = {"adam": 2, "adamw": 2, "adadelta": 2, "rmsprop": 1, "sgd": 1}


def protect_phases(cfg: ProtectConfig, s: Sizes, s32: Sizes, resolution: int, mixed: bool,
                   proposed: bool = False, as_measured: bool = False, device: str = "cuda") -> list[Phase]:
    """Every phase of `protect` in one process, with what it holds. `s`: sizes under the run's
    precision (training steps run under autocast); `s32`: in float32 (set-up, probes and
    sampling run outside autocast). The UNet half frees its optimizers and gradients after each
    stage (and each step's gradients before probes), best checkpoints wait on the CPU (on a
    `device` = "cpu" run that is the same memory, unless `best_checkpoint = "disk"`), the
    teacher is held in `frozen_dtype`, a query's gradient is added to the sum one parameter at
    a time, and with `vae_slicing` the decoder's no-gradient passes run 8 latents at a time.
    `as_measured`: as the code ran when the GPU benchmark's row was measured (2026-11-29),
    keeping alive what accelerate's prepared optimizers hold until Python's cycle collector
    runs, the UNet's last gradients and the best checkpoints on the device, the whole query
    gradient, and decoding 256 latents at once. `proposed`: with the other frozen copies in
    bf16 too (docs/reference/memory.md)."""
    cast = 0.5 if mixed else 0.0  # autocast's 16-bit copy of each trained weight, per step
    frozen_copy = 0.5 if proposed else 1.0  # a frozen module's bytes per float32 byte
    linger = 1 if as_measured else 0
    best = 1 if as_measured or (device == "cpu" and cfg.best_checkpoint == "memory") else 0
    teacher_copy = 0.5 if (proposed or cfg.frozen_dtype == "bfloat16") and not as_measured else 1.0
    whole_query_gradient = 1 if as_measured else 0  # now streamed into the sum (patronus.nft.maml)
    decode_batch = 8 if cfg.vae_slicing and not as_measured else 256
    u, ckpt = cfg.unet, cfg.gradient_checkpointing
    a_unet, a_unet32 = (s.unet_train_ckpt, s32.unet_train_ckpt) if ckpt else (s.unet_train, s32.unet_train)
    a_dec, a_dec32 = (s.decoder_train_ckpt, s32.decoder_train_ckpt) if ckpt else (s.decoder_train, s32.decoder_train)
    encode = 1 if cfg.vae_slicing else 256  # images per encoder pass (encode_latents' batch, or slicing's one)
    image = 3 * resolution**2 * F32
    W, D = s.unet, s.decoder
    phases: list[Phase] = []
    if "unet" in cfg.parts:
        frozen = {"UNet": W, "teacher": teacher_copy * W,
                  "VAE and text encoder": frozen_copy * (s.vae + s.text_encoder)}
        n = u.n_train + u.n_query + u.n_probe
        phases.append(_phase("UNet set-up: encoding the defender's images", frozen,
                             activations=min(encode, n) * s32.encoder_forward))
        rows = (7 if u.w_unknown > 0 else 6) * u.batch_size
        trained = s.align_lora if u.update == "lora" else W
        phases.append(_phase("UNet stage 1 (align)", frozen, gradients=trained, Adam=2 * trained,
                             autocast_copy=cast * trained, activations=rows * a_unet))
        if any(name == "full" for name, _ in u.attacks.updates):
            state = max(STATE_COPIES[name] for name, _ in u.attacks.optimizers)
            attack = {"attacker copy": W, "attacker gradients": W, "attacker optimizer": state * W,
                      "autocast copy": cast * W}
        else:
            attack = {"LoRA weights W + BA": s.attack_lora_base}
        attack["query gradient sum"] = W * (2 if u.nft_attacks_per_step > 1 else 1)
        held = dict(frozen, Adam=2 * W, best_checkpoint=best * W, stage_1_Adam=linger * 2 * trained)
        if u.probe_lora_rank is None or as_measured:
            probe = _phase("UNet probe: a real unet-full attack (float32)", held, probe_copy=W, probe_gradients=W,
                           probe_Adam=2 * W, activations=u.probe_batch * a_unet32)
        else:
            probe = _phase("UNet probe: a real unet-lora attack (float32)", held, probe_copy=W,
                           probe_LoRA_with_gradients_and_Adam=4 * u.probe_lora_rank * s.attack_lora_rank1,
                           activations=u.probe_batch * a_unet32)
        phases += [
            _phase("UNet stage 2: simulated attack, inner step", held, attack,
                   activations=u.attacks.batch_sizes[1] * a_unet),
            _phase("UNet stage 2: simulated attack, query", held, attack,
                   query_gradient=(whole_query_gradient or bool(u.nft_implicit_iters)) * W,
                   activations=3 * u.query_batch * a_unet),
            _phase("UNet stage 2: defender's terms", held, query_gradient_sum=W, gradients=W,
                   autocast_copy=cast * W, activations=rows * a_unet),
            probe,
        ]
    if "decoder" in cfg.parts:
        b = cfg.bank
        sources = len(b.unet_sources or ("original",))
        frozen = {"pipeline's UNet, text encoder and VAE encoder": frozen_copy * (W + s.text_encoder + s.vae - D),
                  "trained decoder": D, "original decoder (a VAE copy)": frozen_copy * s.vae, "VGG": s.vgg,
                  "bank images": (2 * b.n_train + b.n_query + 2 * b.n_probe) * image,
                  "decoded originals": sources * (2 * b.n_train + b.n_probe) * image}
        if "unet" in cfg.parts:
            frozen |= {"aligned UNet": frozen_copy * W, "aligned UNet's last gradients": linger * W,
                       "UNet stage-2 Adam": linger * 2 * W}
        prompts = max(b.n_train, b.n_query, b.n_probe)
        phases += [
            _phase("decoder set-up: sampling the bank (2 rows per prompt for guidance)", frozen,
                   activations=2 * min(64, prompts) * s32.unet_forward),
            _phase(f"decoder set-up: original decoder on the bank (batches of {decode_batch})", frozen,
                   activations=min(decode_batch, sources * b.n_train) * s32.decoder_forward),
        ]
        B, q = cfg.batch_size, cfg.query_batch
        terms = {"activations": 4 * B * a_dec, "VGG activations": 2 * B * s.vgg_train}
        phases.append(_phase("decoder stage 1", frozen, terms, gradients=D, Adam=2 * D, autocast_copy=cast * D))
        state = max(STATE_COPIES[name] for name, _ in cfg.attacks.optimizers)
        held = dict(frozen, Adam=4 * D, best_checkpoint=best * D)  # both stages' optimizers stay alive
        attack = {"attacker copy": D, "attacker gradients": D, "attacker optimizer": state * D,
                  "query gradient sum": D, "autocast copy": cast * D}
        phases += [
            _phase("decoder stage 2: simulated attack, inner step", held, attack,
                   activations=cfg.attacks.batch_sizes[1] * a_dec),
            _phase("decoder stage 2: simulated attack, query", held, attack, query_gradient=whole_query_gradient * D,
                   activations=2 * q * a_dec, VGG_activations=q * s.vgg_train),
            _phase("decoder stage 2: defender's terms", held, terms, query_gradient_sum=D, gradients=D),
            _phase("decoder probe: a real decoder-full attack (float32)", held, probe_copy=s.vae, probe_gradients=D,
                   probe_Adam=2 * D, activations=cfg.probe_batch * a_dec32),
            _phase(f"decoder probe: decoding the probe latents (batches of {decode_batch})", held,
                   attacked_copy=s.vae, activations=min(decode_batch, sources * b.n_probe) * s32.decoder_forward),
        ]
    return phases


def attack_phase(s: Sizes, batch: int, checkpointing: bool) -> Phase:
    """`patronus attack --kind unet-full` with Adam: the larger of the backward pass and Adam's step."""
    acts = batch * (s.unet_train_ckpt if checkpointing else s.unet_train)
    return _phase(f"attack unet-full, Adam, batch {batch}", pipeline=s.unet + s.vae + s.text_encoder,
                  gradients=s.unet, Adam=2 * s.unet, activations_or_Adam_step=max(acts, s.unet))


def evaluate_phase(s32: Sizes, batch: int, slicing: bool) -> Phase:
    """`patronus evaluate` (float32): sampling with guidance (2 rows per image), then decoding."""
    return _phase(f"evaluate, batch {batch}", pipeline=s32.unet + s32.vae + s32.text_encoder,
                  activations=max(2 * batch * s32.unet_forward, (1 if slicing else batch) * s32.decoder_forward))


# --- the command line ----------------------------------------------------------------------------

# The protect settings of the GPU benchmark's 256 px row (2026-11-29, measured at 99209 MiB in bf16): the
# quick preset, both halves, with these overrides (data folders and VGG weights aside).
BENCHMARK_ROW = {
    "perceptual": "vgg19", "vgg_weights": "vgg19.safetensors", "batch_size": 16, "query_batch": 4,
    "stage1_steps": 10, "stage2_steps": 3, "probe_every": 1000, "probe_steps": 1, "probe_batch": 2,
    "checkpoint_every": 1000, "attacks": {"inner_steps": [4, 4], "batch_sizes": [8, 8], "queries_per_attack": 1},
    "bank": {"n_train": 16, "n_query": 8, "n_probe": 8, "sampler_steps": 10},
    "unet": {"n_train": 16, "n_query": 8, "n_probe": 8, "batch_size": 8, "query_batch": 8, "align_steps": 10,
             "align_warmup": 1, "nft_steps": 3, "probe_every": 1000, "probe_steps": 1, "probe_batch": 2,
             "probe_samples": 1, "probe_sampler_steps": 1, "checkpoint_every": 1000,
             "attacks": {"inner_steps": [4, 4], "batch_sizes": [8, 8], "queries_per_attack": 1}},
}


def benchmark_config() -> ProtectConfig:
    return build(ProtectConfig, merge(merge(PRESETS["quick"], BOTH_PARTS["quick"]), BENCHMARK_ROW), "protect")


def table(phases: list[Phase]) -> str:
    lines = ["| phase | predicted GiB | largest terms (GiB) |", "|---|---|---|"]
    return "\n".join(lines + [p.row() for p in phases])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", help="protect config files (.toml, .yaml, .json)")
    p.add_argument("--preset", default="full", help="the preset the config files override")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"], help="accelerate's mixed precision")
    p.add_argument("--widths", default="sd15", choices=["sd15", "narrow"])
    p.add_argument("--batch", type=int, default=8, help="the attack's and the evaluation's batch")
    p.add_argument("--benchmark-row", action="store_true", help="the GPU benchmark's 256 px bf16 row")
    p.add_argument("--proposed", action="store_true",
                   help="with the frozen copies in bf16 too, a change docs/reference/memory.md proposes")
    p.add_argument("--as-measured", action="store_true",
                   help="as the code ran when the GPU benchmark's row was measured (2026-11-29)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the best checkpoint waits in the memory training uses (unless best_checkpoint = 'disk')")
    p.add_argument("--json", help="also write the sizes and every phase to this file")
    args = p.parse_args(argv)
    if args.benchmark_row:
        args.resolution, args.precision = 256, "bf16"
    sizes = measure(args.widths, args.resolution, args.precision)
    s32 = sizes if args.precision == "no" else measure(args.widths, args.resolution, "no")
    print(f"SD-1.5-shaped ({args.widths} widths) at {args.resolution} px, mixed precision {args.precision}; "
          "GiB per copy of the weights or per image:")
    print(", ".join(f"{k} {v / GIB:.3f}" for k, v in vars(sizes).items()))
    configs = [("benchmark row", benchmark_config())] if args.benchmark_row else []
    configs += [(c, load_config(args.preset, c)) for c in args.configs]
    record = {"sizes": vars(sizes), "sizes_float32": vars(s32), "configs": {}}
    for name, cfg in configs:
        phases = protect_phases(cfg, sizes, s32, args.resolution, args.precision != "no", args.proposed,
                                 args.as_measured, args.device)
        peak = max(phases, key=lambda ph: ph.bytes)
        phases += [attack_phase(sizes, args.batch, cfg.gradient_checkpointing),
                   evaluate_phase(s32, args.batch, cfg.vae_slicing)]
        print(f"\n{name}: protect peak {peak.bytes / GIB:.1f} GiB ({peak.name})\n{table(phases)}")
        record["configs"][name] = {"peak_gib": peak.bytes / GIB, "phases": {ph.name: ph.bytes / GIB for ph in phases}}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
