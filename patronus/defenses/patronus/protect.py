"""`patronus protect`: the decoder half (an internal moderator), then the UNet half (`align.py`).

`protect` runs the parts `ProtectConfig.parts` names and writes one pipeline directory. With
`[mark]` it first marks the text encoder's rows of the removed words (`mark.py`); both halves
then read prompts through that encoder (a copy in WORKDIR/marked), and it ships with them. The
decoder half, read top to bottom:
  1. load the pipeline, freeze everything but `post_quant_conv` + `decoder`, keep a frozen
     copy of the original decoder (the calibration target);
  2. build (or load from cache) the feature bank of unsafe and benign latents: the original
     UNet's, and with both parts (`bank.unet_sources`) also the aligned UNet's and an attacked
     copy's, so the UNet half runs first;
  3. stage 1 (unlearn): refusal on unsafe latents/images, reconstruction and calibration on
     benign ones;
  4. stage 2 (non-fine-tunable, fresh optimizer): the same terms plus the first-order MAML
     gradient of the query loss (refusal, and a hinge on the attacker's own reconstruction
     loss) measured along a simulated fine-tuning attack;
  5. every `probe_every` steps a real fine-tuning attack probes the decoder; the checkpoint
     with the best probe score (benign PSNR bar, then attacker MSE and `probe_detector`'s
     unsafe score after the attack) is the one written out;
  6. the stage-1 result is also written, to `WORKDIR/stage1-model`, for ablations.
The output is a standard pipeline directory (only the protected parts differ) and patronus.json.

Everything runs under `accelerate.Accelerator` (one process, or several under `accelerate
launch`: each takes its share of every global batch); state is checkpointed every
`checkpoint_every` steps and `--resume` continues from the newest checkpoint with the same
final result (all randomness is seeded per step, not carried in a stream).
"""

from __future__ import annotations

import copy
import hashlib
import json
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import release_memory
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.func import functional_call
from tqdm.auto import tqdm

from patronus.attacks.weights.decoder import DecoderAttackConfig, attack_decoder, load_head_state
from patronus.attacks.weights.unet import UNetAttackConfig, attack_unet
from patronus.config import settings_changed, to_dict
from patronus.defenses import matching_preset
from patronus.defenses.patronus.align import UNET_OFFSET, align_unet, check_alignment, load_partitions
from patronus.defenses.patronus.bank import PART_START, bank_file, build_feature_bank
from patronus.defenses.patronus.config import ProtectConfig
from patronus.defenses.patronus.defender_data import check_data, unet_folder, unet_start
from patronus.defenses.patronus.distill import check_same_architecture, distill
from patronus.defenses.patronus.losses import (
    make_perceptual,
    perceptual_distance,
    random_patterns,
    refusal_loss,
    scramble_loss,
)
from patronus.defenses.patronus.mark import mark_removed_words
from patronus.detectors import detect_decoded, make_detector
from patronus.errors import ConfigError, OutputExistsError
from patronus.evaluation.metrics import is_refusal
from patronus.imaging import psnr, to_uint8
from patronus.io import atomic_dir, locked_dir
from patronus.modelcard import CARD_FILE, EVALUATION_FILE, write_model_card
from patronus.models.components import DecoderHead, encode_latents
from patronus.models.registry import load_pipeline, resolve_model
from patronus.nft.maml import (
    InnerLoss,
    QueryLoss,
    nft_surrogate,
    second_order_applies,
    simulate_first_order,
    simulate_second_order,
)
from patronus.nft.space import SimulatedAttack, sample_attack
from patronus.provenance import library_versions, state_digest, weight_hashes, weights_digest
from patronus.training import Checkpointer, RunState, capture_outputs, check_replicas_agree, mix_seed, step_generator


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return step_generator(seed, stage * 100_000 + step)


def _cal_weights(original: torch.Tensor, most: float = 10.0) -> torch.Tensor:
    """`cal_weighting = "near-black"`: a weight per benign image, the bank's mean distance of the
    original decoding from black over the image's own (at most `most`), normalised to mean 1.
    Pixel MSE barely sees a glyph dimmed towards the black refusal when it sits on a dark
    background; this makes such an image cost what a bright one does."""
    distance = (original + 1.0).pow(2).mean(dim=(1, 2, 3))
    w = (distance.mean() / distance.clamp_min(1e-8)).clamp(max=most)
    return w / w.mean()


def _scramble_layers(head: DecoderHead) -> list[torch.nn.Module]:
    """The decoder blocks whose outputs representation scrambling acts on, in forward order:
    the middle block and every up block but the last (which must still render black)."""
    return [head.decoder.mid_block, *head.decoder.up_blocks[:-1]]


class Protector:
    """Holds the models, data and losses of one protection run."""

    def __init__(self, model: str, cfg: ProtectConfig, workdir: Path, accelerator: Accelerator,
                 aligned_unet: UNet2DConditionModel | None = None):
        self.cfg, self.workdir, self.accelerator = cfg, workdir, accelerator
        self.model_dir = resolve_model(model)
        device = accelerator.device
        self.pipe = load_pipeline(model).to(device)
        self.pipe.unet.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)
        self.vae = self.pipe.vae
        self.vae.requires_grad_(False)
        self.encoder_digest = state_digest(self.vae.encoder)
        self.original = DecoderHead(copy.deepcopy(self.vae)).requires_grad_(False).eval()
        self.head = DecoderHead(self.vae).requires_grad_(True)
        self.model: torch.nn.Module = self.head  # the prepared (e.g. DDP-wrapped) head, set by `protect`
        if cfg.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        if cfg.vae_slicing:
            self.vae.enable_slicing()
        self.perceptual = make_perceptual(cfg.perceptual, cfg.vgg_weights).to(device)
        self.detector = make_detector(cfg.probe_detector)
        digest = weights_digest(weight_hashes(self.model_dir))
        cache = Path(cfg.bank.cache_dir or workdir / "cache")
        with accelerator.main_process_first():  # one process builds the cache, the others read it
            bank = build_feature_bank(self.pipe, cfg.bank, digest, cache_dir=cache)
            # `z_gen` holds every source's latents, in `unet_sources` order, for the same prompts
            # and seeds: entry i belongs to image i % n of its partition.
            gen = [bank if source == "original" else self._source_bank(source, aligned_unet, cache)
                   for source in cfg.bank.unet_sources]
        for key in [k for k in bank if k.endswith("/z_gen")]:
            bank[key] = torch.cat([b[key] for b in gen])
        self.bank = {k: v.to(device) for k, v in bank.items()}
        self.unflagged = self._replace_unflagged() if cfg.bank.flagged_only else {}
        with torch.no_grad():
            self.orig_benign_gen = self._decode(self.original, self.bank["train/benign/z_gen"])
            self.orig_unsafe_gen = self._decode(self.original, self.bank["train/unsafe/z_gen"])
            self.orig_probe_benign = self._decode(self.original, self.bank["probe/benign/z_gen"])
        self.cal_weights = _cal_weights(self.orig_benign_gen) if cfg.cal_weighting == "near-black" else None
        self.scramble_targets = (self._make_scramble_targets()
                                 if cfg.stage1_w_scramble or cfg.stage2_w_scramble else [])
        self.attack_data = {"x": self.bank["train/unsafe/x"], "z_img": self.bank["train/unsafe/z_img"],
                            "z_gen": self.bank["train/unsafe/z_gen"], "orig_decoded": self.orig_unsafe_gen}

    def _source_bank(self, source: str, aligned: UNet2DConditionModel | None, cache: Path) -> dict[str, torch.Tensor]:
        """The bank as `source`'s UNet (aligned, or aligned then attacked) makes it: same prompts,
        same seeds. The attacked copy is a denoising fine-tune on the UNet half's defender
        training images (never the attacker's), made only when its bank is not cached yet."""
        if aligned is None:
            raise ConfigError(f"bank.unet_sources {source!r} needs the aligned UNet: protect with --parts decoder,unet")
        s = self.cfg.bank
        digest = state_digest(aligned)
        if source == "aligned-attacked":
            attack = UNetAttackConfig("adam", s.attacked_lr, s.attacked_steps, 16,
                                      s.attacked_lora_rank if s.attacked_update == "lora" else None,
                                      seed=mix_seed(self.cfg.seed, 11))
            digest = hashlib.sha256(f"{digest} attacked {json.dumps(attack_key(attack))}".encode()).hexdigest()
            if not bank_file(cache, s, digest).exists():
                train = load_partitions(self.pipe, self.cfg)["train", "unsafe"]
                scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
                aligned = attack_unet(aligned, scheduler, train.mean, train.std, train.hidden,
                                      self.pipe.vae.config.scaling_factor, attack, progress=True)
        original = self.pipe.unet
        self.pipe.unet = aligned
        try:
            return build_feature_bank(self.pipe, s, digest, cache_dir=cache)
        finally:
            self.pipe.unet = original

    @torch.no_grad()
    def _replace_unflagged(self) -> dict[str, int]:
        """`bank.flagged_only`: each unsafe latent of the "original" and "aligned-attacked" UNets
        that the probe detector does not flag, decoded by the original decoder, becomes the
        encoder latent of its own unsafe image, so that only unsafe content is refused. Returns
        how many were replaced per partition."""
        replaced = {}
        for part in PART_START:
            z_gen, z_img = self.bank[f"{part}/unsafe/z_gen"].clone(), self.bank[f"{part}/unsafe/z_img"]
            n, count = len(z_img), 0
            for i, source in enumerate(self.cfg.bank.unet_sources):
                if source == "aligned":
                    continue
                block = z_gen[i * n:(i + 1) * n]  # a view: assigning into it changes z_gen
                found = detect_decoded(self.detector, self._decode(self.original, block))
                unflagged = torch.tensor([not r["unsafe"] for r in found], device=block.device)
                block[unflagged] = z_img[unflagged]
                count += int(unflagged.sum())
            self.bank[f"{part}/unsafe/z_gen"] = z_gen
            replaced[part] = count
        if self.accelerator.is_main_process:
            print(f"decoder bank: unflagged unsafe UNet latents replaced by their images' latents: "
                  f"{', '.join(f'{part} {k}' for part, k in replaced.items())}", flush=True)
        return replaced

    def _decode(self, head: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """No-gradient decoding in batches: 256 latents at once, or 8 with `vae_slicing` (a 512 px
        decoder pass holds 0.75 GiB per image)."""
        batch = 8 if self.cfg.vae_slicing else 256
        return torch.cat([head(z[i:i + batch]) for i in range(0, len(z), batch)])

    def _shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch (all of it in a single-process run)."""
        return idx[self.accelerator.process_index::self.accelerator.num_processes]

    def terms(self, g: torch.Generator, scramble: bool = False, cal_feat: bool = False) -> dict[str, torch.Tensor]:
        """The defender's terms on this process's share of one global batch.

        `rec`: reconstruct benign images; `cal`: benign UNet latents decode as before;
        `refuse_img`, `refuse_feat`: unsafe image latents and unsafe UNet latents decode to
        black; with `scramble`, also `scramble` (see `ProtectConfig.stage1_w_scramble`); with
        `cal_feat`, also `cal_feat`, the calibration in perceptual features. All
        inputs go through the prepared model in one forward pass, so that under DDP the
        gradients of every term are averaged across processes.
        """
        # Indices run over the UNet latents of every source; image i % n goes with latent i.
        b = self._shard(torch.randint(0, len(self.bank["train/benign/z_gen"]), (self.cfg.batch_size,), generator=g))
        u = self._shard(torch.randint(0, len(self.bank["train/unsafe/z_gen"]), (self.cfg.batch_size,), generator=g))
        b_img, u_img = b % len(self.bank["train/benign/x"]), u % len(self.bank["train/unsafe/x"])
        inputs = [self.bank["train/benign/z_img"][b_img], self.bank["train/benign/z_gen"][b],
                  self.bank["train/unsafe/z_img"][u_img], self.bank["train/unsafe/z_gen"][u]]
        sizes = [len(x) for x in inputs]
        with capture_outputs(_scramble_layers(self.head) if scramble else []) as acts:
            rec, cal, unsafe_img, unsafe_gen = self.model(torch.cat(inputs)).split(sizes)
        out = {"rec": F.mse_loss(rec, self.bank["train/benign/x"][b_img]),
               "cal": self._calibration(cal, b),
               "refuse_img": refusal_loss(self.perceptual, unsafe_img),
               "refuse_feat": refusal_loss(self.perceptual, unsafe_gen)}
        if cal_feat:
            out["cal_feat"] = perceptual_distance(self.perceptual, cal, self.orig_benign_gen[b])
        if scramble:
            n_benign = sizes[0] + sizes[1]
            with torch.no_grad(), capture_outputs(_scramble_layers(self.original)) as orig:
                self.original(torch.cat(inputs[:2]))
            out["scramble"] = scramble_loss([a[:n_benign] for a in acts], orig, [a[n_benign:] for a in acts],
                                            self.scramble_targets)
        return out

    def _calibration(self, decoded: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Benign UNet latents decode as the original decoder decodes them (`cal_weighting`)."""
        target = self.orig_benign_gen[b]
        if self.cal_weights is None:
            return F.mse_loss(decoded, target)
        return (self.cal_weights[b] * (decoded - target).pow(2).mean(dim=(1, 2, 3))).mean()

    @torch.no_grad()
    def _make_scramble_targets(self) -> list[torch.Tensor]:
        """One fixed random activation pattern per scrambled layer, at the scale of the original
        decoder's benign activations there: every unsafe latent is pulled to the same pattern."""
        with capture_outputs(_scramble_layers(self.original)) as acts:
            self.original(self.bank["train/benign/z_gen"][:256])
        return random_patterns(acts, torch.Generator().manual_seed(self.cfg.seed))

    def inner_loss_fn(self, attack: SimulatedAttack) -> InnerLoss:
        """The simulated attacker's objective on a batch of its unsafe training data.

        `image`: reconstruct unsafe images from their encoder latents (what a real decoder
        attack does); `feature`: make unsafe UNet latents decode as the original decoder did.
        """
        data = self.attack_data
        inputs, targets = ((data["z_img"], data["x"]) if attack.objective == "image"
                           else (data["z_gen"], data["orig_decoded"]))

        def inner(params: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, len(inputs), (attack.batch_size,), generator=g)
            return F.mse_loss(functional_call(self.head, params, (inputs[idx],)), targets[idx])

        return inner

    def query_loss_fn(self, g: torch.Generator) -> QueryLoss:
        """The defender's score of adapted parameters on a held-out (query) batch of unsafe data:
        refusal of unsafe latents, plus (`refusal+attacker`) the bounded hinge on the attacker's
        reconstruction MSE of held-out unsafe images (see `ProtectConfig.nft_objective`)."""
        cfg = self.cfg
        zq = torch.cat([self.bank["query/unsafe/z_gen"], self.bank["query/unsafe/z_img"]])
        idx = torch.randint(0, len(zq), (cfg.query_batch,), generator=g)
        batch = zq[idx]
        img = torch.randint(0, len(self.bank["query/unsafe/x"]), (cfg.query_batch,), generator=g)
        z_img, x = self.bank["query/unsafe/z_img"][img], self.bank["query/unsafe/x"][img]

        def query(params: dict[str, torch.Tensor]) -> torch.Tensor:
            if cfg.nft_objective == "refusal":
                return refusal_loss(self.perceptual, functional_call(self.head, params, (batch,)))
            out = functional_call(self.head, params, (torch.cat([batch, z_img]),))
            attacker = F.mse_loss(out[len(batch):], x)
            hinge = F.relu(cfg.nft_attacker_tau - attacker) / cfg.nft_attacker_tau
            return refusal_loss(self.perceptual, out[:len(batch)]) + cfg.nft_attacker_weight * hinge

        return query

    @torch.no_grad()
    def probe(self, step: int) -> dict:
        """A real fine-tuning attack on the probe partition (fixed seed), and benign fidelity.

        The attacker trains on the first half of the probe images; the probe reports its
        reconstruction MSE on the other half, the detector's mean unsafe score on unsafe UNet
        latents after the attack (graded, unlike a refusal flag, which every checkpoint fails
        once the attack works), and benign PSNR on held-out benign latents.
        """
        cfg = self.cfg
        x = self.bank["probe/unsafe/x"]
        train_x, held_x = x[:len(x) // 2], x[len(x) // 2:]
        attack = DecoderAttackConfig(cfg.probe_optimizer, cfg.probe_lr, cfg.probe_steps, cfg.probe_batch,
                                     save_at=(cfg.probe_steps,), seed=cfg.seed, max_grad_norm=cfg.probe_max_grad_norm)
        with torch.enable_grad():
            state = attack_decoder(self.vae, train_x, attack)[cfg.probe_steps]
        attacked = DecoderHead(load_head_state(self.vae, state)).eval()
        z_probe = self.bank["probe/unsafe/z_gen"]
        refusal_before = float(is_refusal(to_uint8(self._decode(self.head, z_probe))).mean())
        decoded_after = self._decode(attacked, z_probe).clamp(-1, 1)
        pred = detect_decoded(self.detector, decoded_after)
        scores = np.array([p["unsafe_score"] for p in pred])
        attacker_mse = F.mse_loss(self._decode(attacked, encode_latents(self.vae, held_x)), held_x).item()
        benign = self._decode(self.head, self.bank["probe/benign/z_gen"])
        benign_psnr = psnr(benign, self.orig_probe_benign).mean().item()
        return {"step": step, "refusal_before": refusal_before,
                "refusal_after_probe": float(is_refusal(to_uint8(decoded_after)).mean()),
                "unsafe_after_probe": float(np.mean([p["unsafe"] for p in pred])),
                "unsafe_score_after_probe": float(scores.mean()), "attacker_mse_after_probe": attacker_mse,
                "benign_psnr": benign_psnr, "feasible": benign_psnr >= cfg.min_benign_psnr,
                "score": attacker_mse * (1.0 - float(scores.mean()))}


def protect(model: str, out: Path, cfg: ProtectConfig, workdir: Path, resume: bool = False) -> dict:
    """Harden `cfg.parts` (the decoder, the UNet or both) and write the protected pipeline to
    `out`. Returns patronus.json's content."""
    out, workdir = Path(out), Path(workdir)
    _check_dirs(out, workdir, cfg, resume)
    resolve_model(model)
    check_data(cfg)
    teacher = load_pipeline(model)  # a broken model fails here, before the work directory is made
    accelerator = Accelerator()
    if "unet" in cfg.parts:
        check_alignment(cfg.unet, teacher.unet, accelerator.num_processes)
    if cfg.mark.enabled:  # refuses words it cannot mark before any work; the encoder is kept for the output
        mark_record = mark_removed_words(teacher.tokenizer, teacher.text_encoder, cfg.mark)
        marked_encoder = teacher.text_encoder
    if cfg.distill.teacher is not None:
        teacher = load_pipeline(cfg.distill.teacher)
    if cfg.distill.enabled and cfg.distill.student is not None:
        check_same_architecture(teacher, load_pipeline(cfg.distill.student), cfg.distill.student)
    del teacher
    workdir.mkdir(parents=True, exist_ok=True)
    busy = f"another protect run is using the work directory {workdir}; wait for it to finish or stop it"
    # The main process holds it (under `accelerate launch` the others are the same run); the
    # kernel releases it when that process ends, however it ends.
    with locked_dir(workdir, busy) if accelerator.is_main_process else nullcontext():
        (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        t_start = time.time()
        replaced: dict[str, torch.nn.Module] = {}
        sections: dict[str, dict] = {}
        inside: dict[str, float] = {}  # this session's seconds in each half
        source = resolve_model(model)
        if cfg.mark.enabled:  # both halves read prompts through the marked encoder
            model = str(workdir / "marked")
            if accelerator.is_main_process:  # rewritten every run: a killed run's copy may hold other rows
                shutil.rmtree(model, ignore_errors=True)
                with atomic_dir(model) as tmp:
                    shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("text_encoder"))
                    marked_encoder.save_pretrained(tmp / "text_encoder")
            accelerator.wait_for_everyone()
            replaced["text_encoder"], sections["mark"] = marked_encoder, mark_record
        if cfg.distill.teacher is None:
            # The UNet half first: the decoder's bank may hold the aligned UNet's latents.
            if "unet" in cfg.parts:
                t_half = time.time()
                aligned, sections["unet"] = align_unet(model, cfg, workdir / "unet", resume)
                inside["unet"] = time.time() - t_half
                replaced |= aligned
                release_memory()  # the UNet half's teacher and data, before the decoder half loads its own
            if "decoder" in cfg.parts:
                t_half = time.time()
                replaced["vae"], sections["decoder"] = protect_decoder(model, cfg, workdir, resume, accelerator,
                                                                       replaced.get("unet"))
                inside["decoder"] = time.time() - t_half
        if not cfg.distill.enabled:
            return _write_output(source, out, cfg, replaced, sections, _run_seconds(t_start, inside, sections),
                                 accelerator)
        teacher = cfg.distill.teacher
        if teacher is None:  # this run's protected pipeline, kept in the work directory
            teacher = workdir / "teacher"
            if not (teacher / "patronus.json").exists():
                _write_output(source, teacher, cfg, replaced, sections, _run_seconds(t_start, inside, sections),
                              accelerator)
        t_half = time.time()
        replaced, sections["distill"] = distill(model, teacher, cfg, workdir / "distill", resume)
        inside["distill"] = time.time() - t_half
        return _write_output(resolve_model(teacher), out, cfg, replaced, sections,
                             _run_seconds(t_start, inside, sections), accelerator)


def _run_seconds(t_start: float, inside: dict[str, float], sections: dict[str, dict]) -> float:
    """The run's cost: this session's time outside the halves plus each half's own total, which
    counts the sessions before a resume too. A resumed run's wall time alone would print only
    its last session's, and the cost bar is for the whole run."""
    return (time.time() - t_start - sum(inside.values())
            + sum(sections[half]["timing"]["total_seconds"] for half in inside))


def protect_decoder(model: str, cfg: ProtectConfig, workdir: Path, resume: bool, accelerator: Accelerator,
                    aligned_unet: UNet2DConditionModel | None = None) -> tuple[torch.nn.Module, dict]:
    """The decoder half: both stages; returns the VAE with the chosen decoder and its record.
    `aligned_unet`: the UNet half's result, for `bank.unet_sources`."""
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    p = Protector(model, cfg, workdir, accelerator, aligned_unet)
    opt1 = torch.optim.Adam(p.head.parameters(), lr=cfg.stage1_lr, weight_decay=2e-4)
    # Stage 2 starts from fresh moments: stage 1's would carry its refusal-only history over.
    opt2 = torch.optim.Adam(p.head.parameters(), lr=cfg.stage2_lr, weight_decay=2e-4)
    # Warmup keeps the first refusal gradients from wrecking benign decoding; the cosine
    # decay lets stage 1 settle on a decoder that stage 2 starts from.
    sched = get_cosine_schedule_with_warmup(opt1, cfg.stage1_warmup, cfg.stage1_steps)
    # The prepared head (DDP-wrapped under `accelerate launch` with several processes) is the
    # one every training forward goes through. The schedule is not prepared (a prepared one
    # would step once per process); the checkpoints keep it as JSON.
    p.model, opt1, opt2 = accelerator.prepare(p.head, opt1, opt2)
    run = RunState(Checkpointer(accelerator, workdir, schedulers=(sched,)), best_on_disk=cfg.best_checkpoint == "disk")
    if resume:
        run.restore()
    # Set-up (the feature bank above all) of every session: a resumed run reads a cached bank, so
    # the session that built it must be counted from the checkpoint; training time is in `run`.
    run.state["timing"]["setup_seconds"] = run.state["timing"].get("setup_seconds", 0.0) + time.time() - t_start

    if run.state["stage"] == 1:
        stage1_unlearn(p, opt1, sched, run)
        stage1_model = workdir / "stage1-model"  # the decoder-only, stage-1-only ablation
        if accelerator.is_main_process:
            shutil.rmtree(stage1_model, ignore_errors=True)
        _write_output(p.model_dir, stage1_model, cfg, {"vae": p.vae}, {"decoder": _record(run.state)},
                      time.time() - t_start, accelerator)
        run.save()
    stage2_non_fine_tunable(p, opt2, run)

    check_replicas_agree(accelerator, p.head, "the decoder")
    p.head.load_state_dict(run.best_weights())
    if state_digest(p.vae.encoder) != p.encoder_digest:
        raise RuntimeError("the VAE encoder changed during protection; this is a bug")
    # Every session's time: a resumed run's cost is not only its last session's.
    run.state["timing"]["total_seconds"] = run.worked_seconds() + run.state["timing"]["setup_seconds"]
    return p.vae, _record(run.state)


def _record(state: dict) -> dict:
    """A half's entry in patronus.json: its chosen checkpoint, every probe, timing and losses."""
    return {"chosen_checkpoint": state["best"], "probes": state["probes"], "timing": state["timing"],
            "losses": state["losses"]}


# Settings added after work directories existed (the memory options, the decoder bank's UNet
# sources, unknown-word term, anchored and implicit NFT, attacks per step, UNet scrambling, the
# query's refusal weight, the probes' and simulated attackers' gradient clipping, the gate's
# refusal bar):
# absent from an older run's config.json, they count as unchanged at their defaults.
ADDED_SETTINGS = ("gradient_checkpointing", "vae_slicing", "bank.cache_dir", "bank.unet_sources", "bank.flagged_only",
                  "bank.attacked_update", "bank.attacked_lora_rank", "bank.attacked_steps", "bank.attacked_lr",
                  "unet.w_unknown", "unet.nft_anchor_every", "unet.nft_anchor_steps", "unet.nft_anchor_lr",
                  "unet.nft_implicit_iters", "unet.nft_implicit_alpha", "unet.nft_attacks_per_step",
                  "unet.w_scramble", "distill", "probe_detector", "unet.gate", "unet.min_benign_psnr",
                  "unet.max_feature_distance", "unet.unsafe_dir", "unet.benign_dir", "stage1_w_cal_feat",
                  "unet.probe_lora_rank", "cal_weighting", "frozen_dtype", "best_checkpoint",
                  "unet.nft_refusal_weight", "unet.nft_text_encoder", "probe_max_grad_norm",
                  "unet.probe_max_grad_norm", "attacks.max_grad_norm", "unet.attacks.max_grad_norm",
                  "unet.lora_targets", "unet.w_follow", "unet.follow_rank", "unet.follow_lr", "unet.follow_batch",
                  "unet.follow_reset_every", "mark", "unet.refusal_max_snr", "mark.shared",
                  "mark.shared_share", "unet.min_refusal")


def attack_key(attack: UNetAttackConfig) -> dict:
    """The attacked bank source's settings as its cache key holds them: an unset `max_grad_norm`
    (added later) is left out, so that caches written before it existed are still found."""
    return {k: v for k, v in asdict(attack).items() if not (k == "max_grad_norm" and v is None)}


def _check_dirs(out: Path, workdir: Path, cfg: ProtectConfig, resume: bool) -> None:
    """Refuse, before any work and without writing, outputs in the way and a resume with other settings."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"output directory {out} exists and is not empty; choose another --out")
    if workdir.exists() and not workdir.is_dir():
        raise OutputExistsError(f"work directory {workdir} is a file; choose another --workdir")
    if workdir.exists() and any(workdir.rglob("checkpoint-*")) and not resume:
        raise OutputExistsError(f"{workdir} holds checkpoints of an earlier run; pass --resume or remove it")
    cfg_file = workdir / "config.json"
    absent = to_dict(ProtectConfig())  # what an added setting missing from config.json meant then:
    absent["bank"]["unet_sources"] = ["original"]  # its default before the default came to depend on parts
    absent["unet"]["w_unknown"] = 0.0  # off until v5 (2026-11-29) made it the default
    if resume and cfg_file.exists() and settings_changed(json.loads(cfg_file.read_text()), to_dict(cfg),
                                                         absent, ADDED_SETTINGS):
        raise ConfigError(f"{workdir} was started with different settings; resume with the same config")


def stage1_unlearn(p: Protector, opt: torch.optim.Optimizer, sched, run: RunState) -> None:
    """Refusal on unsafe latents and images; reconstruction and calibration on benign ones."""
    cfg, accelerator, state = p.cfg, p.accelerator, run.state
    bar = tqdm(range(state["step"], cfg.stage1_steps), initial=state["step"], total=cfg.stage1_steps,
               desc="stage 1 (unlearn)", disable=not accelerator.is_main_process)
    for step in bar:
        with accelerator.autocast():  # mixed precision, when accelerate is configured for it
            t = p.terms(_step_generator(cfg.seed, 1, step), scramble=cfg.stage1_w_scramble > 0,
                        cal_feat=cfg.stage1_w_cal_feat > 0)
            loss = (cfg.stage1_w_refuse_img * t["refuse_img"] + cfg.stage1_w_rec * t["rec"]
                    + cfg.stage1_w_refuse_feat * t["refuse_feat"] + cfg.stage1_w_cal * t["cal"]
                    + cfg.stage1_w_scramble * t.get("scramble", 0.0) + cfg.stage1_w_cal_feat * t.get("cal_feat", 0.0))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        state["step"] = step + 1
        run.log(1, loss)
        bar.set_postfix(refuse=f"{t['refuse_feat'].item():.4f}", rec=f"{t['rec'].item():.4f}",
                        cal=f"{t['cal'].item():.5f}")
        if state["step"] % cfg.checkpoint_every == 0:
            run.save()
    state["timing"]["stage1_seconds"] = run.worked_seconds()  # also the sessions before a resume
    state["timing"]["stage1_step_seconds"] = state["timing"]["stage1_seconds"] / max(1, cfg.stage1_steps)
    state["stage"], state["step"] = 2, 0


def stage2_non_fine_tunable(p: Protector, opt: torch.optim.Optimizer, run: RunState) -> None:
    """The benign terms plus the MAML gradient of the refusal loss after a simulated attack;
    a real attack probes the decoder every `probe_every` steps and the best checkpoint is kept."""
    cfg, accelerator, state = p.cfg, p.accelerator, run.state

    def maybe_probe(step: int) -> None:
        if step % cfg.probe_every and step != cfg.stage2_steps:
            return
        result = p.probe(step)
        accelerator.print(f"probe at stage-2 step {step}: {json.dumps(result)}")
        run.record_probe(result, p.head)

    t0 = time.time()
    inner_total, first_step = 0, state["step"]
    bar = tqdm(range(state["step"], cfg.stage2_steps), initial=state["step"], total=cfg.stage2_steps,
               desc="stage 2 (non-fine-tunable)", disable=not accelerator.is_main_process)
    for step in bar:
        g = _step_generator(cfg.seed, 2, step)
        # Each process plays its own simulated attack; their gradients are averaged with the rest.
        attack = sample_attack(np.random.default_rng([cfg.seed, 2, step, accelerator.process_index]), cfg.attacks)
        inner, query = p.inner_loss_fn(attack), p.query_loss_fn(g)
        opt.zero_grad(set_to_none=True)
        with accelerator.autocast():  # the simulated attack too: every forward of the step
            if cfg.stage2_w_nft == 0:  # the ablation: every other term, no simulated attack to pay for
                nft, q_value = torch.zeros((), device=accelerator.device), float("nan")
            elif cfg.second_order and second_order_applies(attack):
                nft = simulate_second_order(p.head, attack, inner, query, g)
                q_value = nft.item()
            else:
                grads, q_value = simulate_first_order(p.head, attack, inner, query, cfg.attacks.queries_per_attack,
                                                      g, cfg.attacks.query_weighting)
                nft = nft_surrogate(p.head, grads)
            if cfg.stage2_w_nft:
                inner_total += attack.steps
            # The benign and refusal batches have their own stream, so the NFT-0 ablation sees the same ones.
            t = p.terms(_step_generator(cfg.seed, 3, step), scramble=cfg.stage2_w_scramble > 0)
            loss = (cfg.stage2_w_nft * nft + cfg.stage2_w_rec * t["rec"] + cfg.stage2_w_cal * t["cal"]
                    + cfg.stage2_w_refuse * (t["refuse_img"] + t["refuse_feat"])
                    + cfg.stage2_w_scramble * t.get("scramble", 0.0))
        accelerator.backward(loss)  # one backward: DDP averages and mixed precision scales every term alike
        opt.step()
        state["step"] = step + 1
        run.log(2, loss)
        bar.set_postfix(query=f"{q_value:.4f}", rec=f"{t['rec'].item():.4f}", cal=f"{t['cal'].item():.5f}",
                        attack=f"{attack.optimizer}/{attack.objective}/{attack.update}x{attack.steps}"
                        if cfg.stage2_w_nft else "none")
        maybe_probe(state["step"])
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.stage2_steps:
            run.save()
    steps_run = state["step"] - first_step
    if steps_run:
        seconds = time.time() - t0
        state["timing"]["stage2_outer_step_seconds"] = seconds / steps_run
        state["timing"]["mean_inner_steps"] = inner_total / steps_run
    if cfg.stage2_steps == 0:
        maybe_probe(0)


def _write_output(model_dir: Path, out: Path, cfg: ProtectConfig, replaced: dict[str, torch.nn.Module],
                  sections: dict[str, dict], seconds: float, accelerator: Accelerator) -> dict:
    """The source pipeline with the `replaced` components (vae, unet), written by the main
    process; returns patronus.json."""
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True,  # the source's card and numbers are not ours
                            ignore=shutil.ignore_patterns("patronus.json", CARD_FILE, EVALUATION_FILE, *replaced))
            for name, module in replaced.items():
                module.save_pretrained(tmp / name)
            info = _provenance(model_dir, cfg, sections, seconds, weight_hashes(tmp), accelerator)
            info["preset"] = matching_preset("patronus", cfg)
            (tmp / "patronus.json").write_text(json.dumps(info, indent=2))
            write_model_card(tmp, info, name=out.name)
    accelerator.wait_for_everyone()
    return json.loads((out / "patronus.json").read_text())


def _provenance(model_dir: Path, cfg: ProtectConfig, sections: dict[str, dict], seconds: float,
                hashes: dict[str, str], accelerator: Accelerator) -> dict:
    original = weight_hashes(model_dir)
    changed = sorted(k for k in hashes if hashes[k] != original.get(k))
    device = accelerator.device
    timing = {"total_seconds": seconds, "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        timing["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    folders = {"unsafe_dir": cfg.bank.unsafe_dir, "benign_dir": cfg.bank.benign_dir}
    data = {}
    if "decoder" in sections:
        data["decoder"] = {"glyph_world_split": None if cfg.bank.unsafe_dir else "defender",
                           "partition_offsets": PART_START, **folders, "unsafe_prompts": cfg.bank.unsafe_prompts,
                           "benign_prompts": cfg.bank.benign_prompts}
    if "unet" in sections:
        unet_folders = {f"{kind}_dir": unet_folder(cfg, kind) for kind in ("unsafe", "benign")}
        data["unet"] = {"glyph_world_split": None if unet_folders["unsafe_dir"] else "defender",
                        "partition_offsets": {k: v + UNET_OFFSET for k, v in PART_START.items()}, **unet_folders}
        if any(unet_folders.values()):  # where the UNet half's images begin in each folder
            data["unet"]["first_image"] = {kind: unet_start(cfg, kind) for kind in ("unsafe", "benign")}
    return {
        "patronus_version": library_versions()["patronus"],
        "source_model": {"path": str(model_dir.resolve()), "weights_sha256": weights_digest(original)},
        "parts": [part for part in ("mark", "decoder", "unet", "distill") if part in sections],
        "config": to_dict(cfg),
        "data": data,
        "seeds": {"run": cfg.seed},
        "device": str(device),
        "processes": accelerator.num_processes,
        **sections,  # per part: chosen checkpoint, probes, timing, losses (total loss per step)
        "timing": timing,
        "changed_weight_files": changed,
        "weight_files_sha256": hashes,
        "versions": library_versions(),
    }
