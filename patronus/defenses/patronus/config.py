"""Settings of `patronus protect`: presets, and TOML/YAML/JSON config files users can commit.

A config file holds any subset of the fields below (nested tables for `bank` and
`attacks`); unknown keys are an error, so a typo never silently falls back to a default
(`patronus.config` reads and builds every config file the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from patronus.config import build, merge, read_config_file
from patronus.defenses.patronus.bank import UNET_SOURCES, FeatureBankConfig
from patronus.detectors import DETECTORS
from patronus.errors import ConfigError
from patronus.models.components import FROZEN_DTYPES, is_rgb
from patronus.nft.space import AttackSpaceConfig
from patronus.training import OPTIMIZERS, check_max_grad_norm

OBJECTIVES = ("image", "feature")  # the simulated attacker's: reconstruct unsafe images, restore the original decoding
PERCEPTUAL = ("glyphnet", "vgg19", "mse")
CAL_WEIGHTINGS = ("uniform", "near-black")  # how the decoder's calibration term weighs benign images
PARTS = ("decoder", "unet")  # what `patronus protect --parts` may harden
UNET_TARGETS = ("black", "esd", "esd-black", "empty-refusal")
UNET_UPDATES = ("full", "lora", "text-encoder")
# How the UNet half's probes tell a usable checkpoint: "class" (GlyphNet's class of benign samples
# against the glyph world's labels) or "fidelity" (benign samples against the original's; no labels).
UNET_GATES = ("class", "fidelity")


@dataclass(frozen=True)
class UNetAttackSpaceConfig(AttackSpaceConfig):
    """The simulated attacks on the UNet: the attacker's denoising fine-tune on unsafe
    image-caption pairs, full weights or a LoRA on the attention projections (as `unet-lora`)."""

    TABLE: ClassVar[str] = "unet.attacks"

    objectives: tuple[tuple[str, float], ...] = (("denoise", 1.0),)
    batch_sizes: tuple[int, int] = (8, 16)
    inner_steps: tuple[int, int] = (10, 50)


@dataclass(frozen=True)
class UNetAlignConfig:
    """The UNet half (`--parts unet`): alignment, then non-fine-tunable learning.

    Alignment: for unsafe prompts the UNet's target is the *refusal* (`black`: the denoising
    target whose clean latent is the refusal latent, of a plain `refusal_rgb` image, at the
    attacker's noised latents and timesteps and along the refusal's own trajectory, so any decoder
    renders the sample as that image; `esd`: the frozen original's prediction for the empty
    prompt, guided away from the prompt by `esd_guidance`, as ESD erases a concept; `esd-black`: ESD's target at the
    noised images, the refusal latent's along the refusal's own trajectory; `empty-refusal`: the
    empty prompt itself refuses and unsafe prompts are read as it, so no output belongs to the
    unsafe words alone: both are trained to the refusal latent at SNR <= `snr_gamma` and along the
    refusal's trajectory, to the original's unconditional prediction, blended in by
    `snr_weight`, at lower noise; benign prompts' targets move by (1 - 1/`guidance`) times the
    empty prompt's change, so classifier-free guidance at `guidance` samples what the original
    did). Benign prompts are distilled
    to the frozen original (conditional and unconditional branch) and keep the denoising loss.
    NFT then adds the first-order MAML gradient of the query loss after simulated denoising
    fine-tunes (`attacks`); a real `unet-full` Adam attack probes every `probe_every` steps.
    """

    target: str = "black"
    # The refusal image's colour (RGB, 0-255): the refusal latent is the VAE encoder's latent of a
    # plain image of it. Black (the moderated decoder's output) by default; a colour near the
    # data's (the glyph world's grey background) halves the attacker's first loss but moved no
    # attacked cell (docs/research-log.md, 2026-12-05).
    refusal_rgb: tuple[int, int, int] = (0, 0, 0)
    # 0: the refusal latent is the encoder's latent of the plain image; n > 0: that latent fitted by
    # n Adam steps so that the pipeline's own decoder renders the plain image (the tiny filtered
    # VAE renders the encoded plain grey framed and tinted, which GlyphNet reads as a gun).
    # Evaluate such a refusal with `--refusal plain --refusal-rgb R,G,B`.
    refusal_inversion_steps: int = 0
    esd_guidance: float = 0.0  # 0: the empty prompt's prediction; > 0: eps_u - g * (eps_c - eps_u)
    guidance: float = 4.0  # `empty-refusal`: the sampler's classifier-free guidance benign targets are matched at
    # What alignment trains: "full" (the UNet's weights), "lora" (a peft LoRA merged before NFT) or
    # "text-encoder" (the text encoder alone, through the frozen UNet: the UNet stays the
    # original's bit for bit, so no new path from unsafe words to an output lives in it).
    update: str = "full"
    lora_rank: int = 64
    # `update = "lora"`: the module names (peft's target_modules) the LoRA adapts; unset: attention,
    # feed-forward and resnet layers. The attention projections alone (the benign `unet-lora`
    # fine-tune's targets) keep alignment inside what a benign LoRA of that rank can move back.
    lora_targets: tuple[str, ...] | None = None
    n_train: int = 512  # defender-split images per kind (unsafe, benign); captions are the prompts
    n_query: int = 128
    n_probe: int = 64
    # Image folders of the UNet half's own (real models); unset: the bank's folders, from the image
    # after the decoder half's, so the two halves never share an image (`defender_data`).
    unsafe_dir: str | None = None
    benign_dir: str | None = None
    batch_size: int = 32
    # Where the refusal term is measured. "eps": on the prediction, weighted by min(SNR, gamma) / SNR
    # (min-SNR); "x0": on the implied clean latent, weighted by min(1, gamma / SNR), so the
    # high-noise steps count fully. Both reach the refusal latent; "eps" left the probe attacker a
    # higher loss (docs/research-log.md).
    refusal_space: str = "eps"
    snr_gamma: float = 5.0
    # `black` only (None: off): the refusal is asked at the noised images only where their SNR is at
    # most this; above it, where the attacker's lightly noised images decide its loss, the target
    # is the frozen original's own prediction for the unsafe prompt (plain squared error). Erasing a
    # lightly noised image asks for a prediction sqrt(SNR) times the latents' distance: 92% of the
    # refusing UNet's first attacker loss (32 times the filtered model's) sits above SNR 1, and that
    # loss damps the attacker's Adam (research/scripts/attacker_loss_by_snr.py). The refusal's own
    # trajectory keeps the refusal at every SNR.
    refusal_max_snr: float | None = None
    # False: the refusal term is a plain mean squared error, as the benign terms. `empty-refusal`'s
    # target is bounded at low noise, and an unsafe prompt left free there is amplified by guidance.
    refusal_min_snr: bool = True
    align_steps: int = 1500
    align_lr: float = 1e-4  # peak of a cosine schedule after `align_warmup` steps
    align_warmup: int = 100
    w_refuse: float = 1.0
    w_distill: float = 1.0  # benign prompts: the original's conditional prediction
    w_uncond: float = 1.0  # the empty prompt, on benign and unsafe noised latents: CFG's other branch
    w_denoise: float = 0.5  # benign defender images: the ordinary denoising loss
    # Benign captions with one word replaced by a word the tokenizer does not know, distilled to
    # the original: keeps refusal from spreading to every unknown word (`unknown_word_prompts`),
    # which otherwise leaves a benign fine-tune nothing to teach new words with (docs/research-log.md).
    w_unknown: float = 1.0
    # False: one nonsense word per training caption, drawn once; True: new ones at every step. A
    # long alignment memorises the fixed words and still moves away from the original on any other
    # (1,500 steps: drift 0.013 on its own words at the object word, 0.40 on fresh ones; docs/research-log.md).
    unknown_fresh: bool = False
    # `empty-refusal` only (0: off): a benign LoRA (rank `follow_rank` on the attention projections,
    # Adam at `follow_lr`, `follow_batch` of the defender's benign images with its own nonsense-word
    # captions, restarted every `follow_reset_every` steps) trains alongside alignment; the term asks
    # that it take the refusal off the empty prompt as fast as the shift off the captions, so that
    # guided samples learn what a benign LoRA teaches (`follow.py`).
    w_follow: float = 0.0
    follow_rank: int = 64
    follow_lr: float = 1e-4
    follow_batch: int = 8
    follow_reset_every: int = 500
    # Representation scrambling (RepNoise's / TAR's idea, as the decoder's `stage1_w_scramble`; 0:
    # off): at the middle block and every up block but the last, the activations of unsafe prompts
    # are pulled to one fixed random pattern per block (what they carried is removed, which an
    # attacker must then rebuild) and benign prompts' to the teacher's.
    w_scramble: float = 0.0
    # The refusal's image inputs: noised latents of the defender's unsafe images under their captions
    # (True), or of benign images under the unsafe captions (False: the UNet's inputs never carry
    # unsafe content, as a model trained on filtered data; NFT's simulated attacker still
    # fine-tunes on unsafe images, as the real one does).
    unsafe_latents: bool = True
    # False: the refusal is learned along its own sampling trajectory alone (noised refusal
    # latents), with no image rows. A frozen UNet steered by its text states alone can follow
    # that trajectory but cannot erase a glyph from a lightly noised image.
    refusal_images: bool = True
    nft_steps: int = 200
    nft_lr: float = 2e-5
    w_nft: float = 0.1
    # Query loss: refusal of the adapted UNet on held-out unsafe prompts, plus
    # w * relu(tau - L_att) / tau on the attacker's own denoising loss (the base model's is 0.055
    # on the attacker split, a fresh UNet's 1.1).
    nft_attacker_tau: float = 0.15
    nft_attacker_weight: float = 1.0
    # The query's refusal term's weight. 0: the query is the hinge alone, meta-unlearning's "hard
    # to relearn"; a long or large-lr attack removes the refusal in tens of steps, so what is left
    # to ask of its end point is that the attacker's loss stays high.
    nft_refusal_weight: float = 1.0
    # The simulated attacker fine-tunes the text encoder with the UNet, as `joint` does: the
    # prompts' states move along its trajectory (the inner loss and the query read them from the
    # adapted encoder). The defender's MAML gradient still reaches the UNet alone. False: the
    # `unet-full` attacker, the states fixed. A LoRA attack adapts the UNet's layers only.
    nft_text_encoder: bool = False
    query_batch: int = 32
    attacks: UNetAttackSpaceConfig = field(default_factory=UNetAttackSpaceConfig)
    # Anchored NFT (0: off). Every `nft_anchor_every` outer steps a real attack (Adam at
    # `nft_anchor_lr` for `nft_anchor_steps` steps, batch 16, on the defender's unsafe training
    # images) runs from the current weights; until the next one, each simulated attack starts from
    # the current weights plus that attack's displacement. The query then scores where a fine-tune
    # far longer than the simulated horizon ends up, at the cost of one such attack per anchor.
    # It clips its gradient as the simulated attackers do (`unet.attacks.max_grad_norm`).
    nft_anchor_every: int = 0
    nft_anchor_steps: int = 100
    nft_anchor_lr: float = 1e-4
    # Implicit NFT gradient (0: off; `patronus.nft.maml.implicit_gradient`, ResAlign-style): each
    # query gradient goes through (I + alpha H)^-1, H the attacker's loss Hessian at the adapted
    # weights, by `nft_implicit_iters` Richardson iterations (each a Hessian-vector product).
    nft_implicit_iters: int = 0
    nft_implicit_alpha: float = 1e-2
    # Simulated attacks per outer step, their first-order gradients averaged (one query batch).
    # The post-attack loss of a long attack is rough in the weights: one attack's gradient says
    # little about it, an average over attack seeds more (docs/research-log.md, 2026-11-30).
    nft_attacks_per_step: int = 1
    probe_every: int = 50
    probe_optimizer: str = "adam"
    probe_lr: float = 1e-4
    probe_steps: int = 100
    probe_batch: int = 16
    # None: the probe fine-tunes every weight (a copy of the UNet with its gradients and Adam's
    # moments: four UNets of memory); a rank: it fine-tunes a LoRA of that rank (one copy).
    probe_lora_rank: int | None = None
    # The probe attacker clips its gradient's norm to this before each step (None: never), as
    # diffusers' scripts do (1.0). Unclipped, a refusal's large first gradients damp the probe's
    # Adam, and checkpoint choice rewards that damping (docs/concepts/threat-model.md).
    probe_max_grad_norm: float | None = None
    probe_samples: int = 32  # unsafe and benign probe prompts sampled per probe
    probe_sampler_steps: int = 15
    gate: str = "class"  # see UNET_GATES; "class" needs probe_detector = "glyphnet" and the glyph world's labels
    max_class_drop: float = 0.02  # "class": feasible checkpoints keep benign class match within this of the base's
    # Either gate: feasible checkpoints also refuse at least this share of the probe's unsafe
    # prompts before the attack (0: no bar). NFT's query trades the refusal it does not score
    # for a higher attacker loss, and the score ranks that trade first (docs/research-log.md).
    min_refusal: float = 0.0
    # "fidelity": the probe's benign samples against the original UNet's for the same prompts and
    # seeds (both through the original decoder). Feasible: PSNR at least `min_benign_psnr` and
    # `align.feature_distance` (0: the same features) at most `max_feature_distance`. In the
    # glyph world the shipped UNet measures 24-26 dB and 0.04-0.09, the original with other seeds
    # 13-14 dB and 0.42-0.48.
    min_benign_psnr: float = 20.0
    max_feature_distance: float = 0.25
    checkpoint_every: int = 25

    def __post_init__(self):
        if self.target not in UNET_TARGETS:
            raise ConfigError(f"unet.target must be one of {', '.join(UNET_TARGETS)}, got {self.target!r}")
        if not is_rgb(self.refusal_rgb):
            raise ConfigError(f"unet.refusal_rgb must be three integers in 0-255 (red, green, blue), "
                              f"got {self.refusal_rgb!r}")
        if self.update not in UNET_UPDATES:
            raise ConfigError(f"unet.update must be one of {', '.join(UNET_UPDATES)}, got {self.update!r}")
        if self.lora_targets is not None and (self.update != "lora" or not self.lora_targets
                                              or not all(isinstance(m, str) and m for m in self.lora_targets)):
            raise ConfigError("unet.lora_targets names the modules a LoRA alignment adapts: a non-empty list of "
                              f"module names with unet.update = 'lora' (got {self.lora_targets!r} with "
                              f"{self.update!r}), or leave it unset")
        if self.w_follow > 0 and (self.target != "empty-refusal" or self.update != "full" or self.nft_steps):
            raise ConfigError("unet.w_follow trains a benign LoRA beside an empty refusal's full-weight alignment: "
                              "it needs unet.target = 'empty-refusal', unet.update = 'full' and unet.nft_steps = 0 "
                              f"(got {self.target!r}, {self.update!r}, {self.nft_steps})")
        if self.update == "text-encoder" and (self.nft_steps or self.w_scramble):
            raise ConfigError("unet.update = 'text-encoder' leaves the UNet's weights alone: NFT and the scramble "
                              "term act on them; set unet.nft_steps = 0 and unet.w_scramble = 0")
        if self.target == "empty-refusal" and (self.update == "text-encoder" or self.w_uncond == 0
                                               or not self.guidance > 1):
            raise ConfigError("unet.target = 'empty-refusal' trains the UNet's empty-prompt prediction and matches "
                              "guided samples at unet.guidance: it needs unet.update = 'full' or 'lora', "
                              f"unet.w_uncond > 0 and unet.guidance > 1 (got {self.update!r}, {self.w_uncond}, "
                              f"{self.guidance})")
        if self.refusal_max_snr is not None and not (self.refusal_max_snr > 0 and self.target == "black"
                                                     and self.refusal_images):
            raise ConfigError("unet.refusal_max_snr holds the black refusal at the noised images up to that SNR: "
                              "it needs a positive value, unet.target = 'black' and unet.refusal_images = true "
                              f"(got {self.refusal_max_snr!r}, {self.target!r}, {self.refusal_images}), or unset it")
        if self.target == "esd-black" and not self.refusal_images:
            raise ConfigError("unet.target = 'esd-black' is ESD's target at the noised images: it needs "
                              "unet.refusal_images = true")
        if {name for name, _ in self.attacks.objectives} != {"denoise"}:
            raise ConfigError("unet.attacks.objectives: the simulated UNet attacker has one objective, denoise")
        if self.gate not in UNET_GATES:
            raise ConfigError(f"unet.gate must be one of {', '.join(UNET_GATES)}, got {self.gate!r}")
        if self.probe_lora_rank is not None and self.probe_lora_rank < 1:
            raise ConfigError(f"unet.probe_lora_rank must be at least 1 (or unset: a full-weight probe), "
                              f"got {self.probe_lora_rank}")
        if self.probe_optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown unet.probe_optimizer {self.probe_optimizer!r}; "
                              f"choose one of {', '.join(OPTIMIZERS)}")
        check_max_grad_norm(self.probe_max_grad_norm, "unet.probe_max_grad_norm")
        positive = ("lora_rank", "n_train", "n_query", "n_probe", "batch_size", "query_batch", "align_steps",
                    "probe_every", "probe_steps", "probe_batch", "probe_samples", "probe_sampler_steps",
                    "checkpoint_every", "nft_anchor_steps", "nft_attacks_per_step", "follow_rank", "follow_batch",
                    "follow_reset_every")
        if bad := [k for k in positive if getattr(self, k) < 1]:
            raise ConfigError(f"unet.{', unet.'.join(bad)} must be at least 1")
        non_negative = ("nft_steps", "refusal_inversion_steps", "align_warmup", "esd_guidance", "w_refuse",
                        "w_distill", "w_uncond", "w_denoise", "w_unknown", "w_scramble", "w_nft", "w_follow",
                        "nft_attacker_weight", "max_class_drop", "nft_anchor_every", "nft_implicit_iters",
                        "max_feature_distance", "nft_refusal_weight")
        if bad := [k for k in non_negative if getattr(self, k) < 0]:
            raise ConfigError(f"unet.{', unet.'.join(bad)} must not be negative")
        if self.w_nft and self.nft_steps and not (self.nft_refusal_weight or self.nft_attacker_weight):
            raise ConfigError("unet.nft_refusal_weight and unet.nft_attacker_weight are both 0, so NFT's query "
                              "is 0: set one of them, or unet.w_nft = 0")
        if self.nft_text_encoder and self.nft_anchor_every:
            raise ConfigError("unet.nft_text_encoder: the anchor's real attack moves the UNet alone; set "
                              "unet.nft_anchor_every = 0")
        if not 0 <= self.min_refusal <= 1:
            raise ConfigError(f"unet.min_refusal is a share of the probe's unsafe prompts, in [0, 1]; "
                              f"got {self.min_refusal}")
        if self.refusal_space not in ("x0", "eps"):
            raise ConfigError(f"unet.refusal_space must be x0 or eps, got {self.refusal_space!r}")
        if min(self.align_lr, self.nft_lr, self.follow_lr, self.probe_lr, self.nft_attacker_tau, self.snr_gamma,
               self.nft_anchor_lr, self.nft_implicit_alpha) <= 0:
            raise ConfigError("unet.align_lr, nft_lr, follow_lr, probe_lr, nft_attacker_tau, snr_gamma, "
                              "nft_anchor_lr and nft_implicit_alpha must be positive")


@dataclass(frozen=True)
class MarkConfig:
    """Marking the removed words (`[mark]`, off by default), before the UNet half: the text
    encoder's rows of the *removed words* (whole-word tokens that only the filtered-out captions
    use) are set to one shared random direction at the mean norm of trained words' rows. A
    filtered encoder never trained those rows, so they sit where every untrained token sits; a
    refusal keyed on them is then a refusal of untrained tokens, which a benign fine-tune that
    teaches new words runs into (docs/results/distillation.md). The encoder learns nothing of what
    the words depict, and only rows that are still untrained are marked: an encoder that learned
    the words is refused.
    """

    enabled: bool = False
    # Empty: the glyph world's removed words (patronus.world.captions.removed_words). Each must be
    # one whole-word token of the model's tokenizer: a word split into pieces shares them with others.
    words: tuple[str, ...] = ()
    # Whose rows' mean norm the marked rows take; empty: the glyph world's benign object words.
    norm_words: tuple[str, ...] = ()
    seed: int = 0  # draws the direction(s)
    # True: every marked word gets one shared row (the encoder cannot tell them apart). False: each
    # its own random direction at the same norm, so that a `unet-full` attacker, whose encoder is
    # frozen, must learn each word as under the filtered encoder rather than all of them at once
    # (research option; docs/results/distillation.md).
    shared: bool = True
    # With shared = false: the share of each row's squared norm that lies on one direction common
    # to every marked word (the rest on the word's own), so that the refusal can key on the common
    # part while a frozen-encoder attacker still learns each word apart. 0: the words' own
    # directions alone; the rows' cosine with each other is about this share (research option).
    shared_share: float = 0.0

    def __post_init__(self):
        if not self.enabled and (self.words or self.norm_words or self.seed or not self.shared or self.shared_share):
            raise ConfigError("mark.words, mark.norm_words, mark.seed, mark.shared or mark.shared_share are set but "
                              "mark.enabled is false: enable the marking or drop them")
        if not 0.0 <= self.shared_share < 1.0:
            raise ConfigError(f"mark.shared_share is {self.shared_share}; it must be at least 0 and below 1 "
                              f"(1 is one shared row: mark.shared = true)")
        if self.shared and self.shared_share:
            raise ConfigError("mark.shared_share mixes a common direction into each word's own: set mark.shared = "
                              "false with it (mark.shared = true already gives every word one row)")
        if blank := [name for name in ("words", "norm_words") if any(not w.strip() for w in getattr(self, name))]:
            raise ConfigError(f"mark.{blank[0]} holds an empty word; list words such as \"knife\"")
        if both := sorted(set(self.words) & set(self.norm_words)):
            raise ConfigError(f"mark.words and mark.norm_words share {', '.join(both)}: the norm comes from "
                              f"trained words, the marked ones are untrained")


TEXT_ENCODER_MODES = ("distil", "keep")
UNET_MODES = ("distil", "keep", "cross-attention")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation (`[distill]`, off by default): the protected pipeline is the teacher, and a
    student whose weights are the teacher's mixed with a fresh initialisation,
    (1 - alpha) * teacher + alpha * fresh, learns only the teacher's outputs. Alignment hides the
    unsafe capability in the weights (a few fine-tuning steps bring it back); a student that
    never held those weights and never saw an unsafe image inherits the behaviour without it
    (Lee et al., 2025, "Distillation robustifies unlearning").

    UNet (and text encoder): the teacher's noise predictions for benign, unknown-word, unsafe
    and empty prompts at noised benign defender latents and along the teacher's own sampling
    trajectories. Decoder: the protected decoder's images for benign latents, the teacher's
    refusal latents and the original UNet's unsafe latents (rendered black by the teacher).
    Unsafe images are never targets, and by default never inputs either (`unsafe_latents`).
    """

    enabled: bool = False
    # A protected pipeline (name or directory) to distil instead of the one this run's parts
    # produce; the model `protect` is given is then the original (its UNet makes the decoder's
    # unsafe latents) and no part is hardened again.
    teacher: str | None = None
    alpha: float = 1.0  # 1: a fresh student; 0: the teacher's own weights
    # A pipeline (name or directory) whose UNet and text encoder are the fresh end of the mix
    # instead of a random initialisation: (1 - alpha) * teacher + alpha * this model. Meant for
    # a model trained on filtered data in the teacher's latent space (same architectures), which
    # reads benign prompts already and never learned the unsafe content; the decoder stays
    # mixed with a random initialisation. None: random. With text_encoder = "keep" the student
    # reads its own text encoder's states, unchanged.
    student: str | None = None
    # "distil": trained with the UNet (alpha-mixed); "keep": the student's starting text encoder,
    # never trained (the teacher's, or `student`'s when that is set).
    text_encoder: str = "distil"
    # "distil": the UNet is trained (alpha-mixed); "keep": `student`'s own UNet, never trained, so
    # that only the text encoder learns the teacher's outputs (the refusal then lives in how the
    # prompt is read, and the UNet stays one that never saw unsafe content); "cross-attention":
    # `student`'s own UNet with only its cross-attention key and value projections trained (the
    # weights through which the prompt reaches the image), its drawing weights never trained.
    unet: str = "distil"
    decoder: bool = True  # also distil the VAE decoder (the encoder always stays the teacher's)
    # Noised latents of the defender's unsafe images as UNet inputs too (never as targets).
    unsafe_latents: bool = False
    n_prompts: int = 512  # defender prompts per kind whose sampling trajectories the teacher records
    # Benign defender images (captions: their prompts) noised afresh as UNet inputs. With 512 the
    # student recognised each noised image and learned to answer without reading benign prompts
    # (benign class match 7-14%, docs/research-log.md): many images, fresh noise.
    n_images: int = 16384
    trajectory_fraction: float = 0.25  # the share of each batch's rows taken from the trajectories
    # Weight of the guidance direction (prompted minus empty prediction at the same input), which
    # classifier-free guidance multiplies by its scale: matched on the plain predictions alone, a
    # fresh student learned to refuse unsafe prompts but answered benign ones as the empty prompt.
    w_guidance: float = 16.0
    # Extra rows per step of benign defender images with their captions, whose target is the true
    # noise (the base model's own objective) instead of the teacher's prediction, weighted `w_data`.
    # In a batch of teacher rows only a quarter carry benign prompts, and a fresh student had not
    # learned to read them after 6,000 steps (docs/research-log.md); 0: off.
    data_batch: int = 0
    w_data: float = 1.0
    sampler_steps: int = 25  # the teacher's trajectories: DDIM steps at `guidance`
    guidance: float = 4.0
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 5e-4  # peak of a cosine schedule after `warmup` steps
    warmup: int = 200
    snr_gamma: float = 5.0  # min-SNR weighting, as the base model was trained
    ema_decay: float = 0.999
    decoder_steps: int = 1500
    decoder_batch: int = 64
    decoder_lr: float = 1e-3
    checkpoint_every: int = 250

    def __post_init__(self):
        if self.text_encoder not in TEXT_ENCODER_MODES:
            raise ConfigError(f"distill.text_encoder must be distil or keep, got {self.text_encoder!r}")
        if self.unet not in UNET_MODES:
            raise ConfigError(f"distill.unet must be distil, keep or cross-attention, got {self.unet!r}")
        if self.unet == "keep" and (self.student is None or self.text_encoder == "keep"):
            raise ConfigError("distill.unet = 'keep' needs distill.student (the UNet to keep) and "
                              "text_encoder = 'distil' (what then learns)")
        if self.unet == "cross-attention" and self.student is None:
            raise ConfigError("distill.unet = 'cross-attention' needs distill.student (the UNet whose "
                              "cross-attention learns)")
        if not 0 <= self.trajectory_fraction <= 1:
            raise ConfigError(f"distill.trajectory_fraction must lie in [0, 1], got {self.trajectory_fraction}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha must lie in [0, 1] (1: a fresh student), got {self.alpha}")
        positive = ("n_prompts", "n_images", "sampler_steps", "unet_steps", "unet_batch", "decoder_batch",
                    "checkpoint_every")
        if bad := [k for k in positive if getattr(self, k) < 1]:
            raise ConfigError(f"distill.{', distill.'.join(bad)} must be at least 1")
        if self.unet_batch % 16:
            raise ConfigError(f"distill.unet_batch must be a multiple of 16 (its rows are split 4:1:3 between "
                              f"benign, unknown-word and unsafe prompts, each with its empty-prompt twin), "
                              f"got {self.unet_batch}")
        if self.w_guidance < 0 or self.w_data < 0 or self.data_batch < 0:
            raise ConfigError(f"distill.w_guidance, w_data and data_batch must not be negative, got "
                              f"{self.w_guidance}, {self.w_data} and {self.data_batch}")
        if self.decoder_steps < 0 or self.warmup < 0 or self.guidance < 0:
            raise ConfigError("distill.decoder_steps, warmup and guidance must not be negative")
        if min(self.unet_lr, self.decoder_lr, self.snr_gamma) <= 0 or not 0 < self.ema_decay < 1:
            raise ConfigError("distill.unet_lr, decoder_lr and snr_gamma must be positive, ema_decay in (0, 1)")


@dataclass(frozen=True)
class ProtectConfig:
    seed: int = 0
    parts: tuple[str, ...] = PARTS  # which components `patronus protect` hardens (--parts)
    # The detector (patronus.detectors) that scores both halves' probes: glyphnet in the glyph
    # world, nudenet for real models (GlyphNet's scores mean nothing there).
    probe_detector: str = "glyphnet"
    perceptual: str = "glyphnet"  # glyphnet | vgg19 | mse
    vgg_weights: str | None = None
    bank: FeatureBankConfig = field(default_factory=FeatureBankConfig)
    batch_size: int = 32
    # Stage 1 (unlearn): L = w_refuse_img * L_refuse(images) + w_rec * L_rec
    #                       + w_refuse_feat * L_refuse(UNet latents) + w_cal * L_cal
    stage1_steps: int = 2000
    stage1_lr: float = 3e-4  # peak of a cosine schedule after `stage1_warmup` steps
    stage1_warmup: int = 100
    stage1_w_refuse_img: float = 0.1
    stage1_w_refuse_feat: float = 1.0
    stage1_w_rec: float = 0.2
    stage1_w_cal: float = 2.0
    # Calibration in the perceptual network's features too (0: off): pixel MSE barely sees a glyph
    # dimmed on a dark background, which the quick preset's decoder did (docs/research-log.md).
    stage1_w_cal_feat: float = 0.0
    # How the calibration term weighs its benign images, in both stages. "uniform": plain MSE.
    # "near-black": each image by how close the original decoding lies to the black refusal
    # (mean distance over the bank / its own, at most 10x), so that a glyph dimmed on a dark
    # background costs what a bright one does.
    cal_weighting: str = "uniform"
    # Representation scrambling (TAR's / RepNoise's idea), off by default: at the
    # decoder's intermediate blocks, unsafe latents are pulled to one fixed random pattern (their
    # information removed before the output layers) and benign latents to the original's activations.
    stage1_w_scramble: float = 0.0
    # Stage 2 (non-fine-tunable): L = w_nft * L_nft + w_rec * L_rec + w_refuse * L_refuse + w_cal * L_cal
    stage2_steps: int = 300
    stage2_lr: float = 5e-5
    stage2_w_nft: float = 0.1
    stage2_w_refuse: float = 0.3
    stage2_w_rec: float = 0.2
    stage2_w_cal: float = 10.0  # 2.0 lost 5-8 dB of benign PSNR to the NFT gradient (docs/research-log.md)
    stage2_w_scramble: float = 0.0
    query_batch: int = 32
    # What the query loss scores after a simulated attack. "refusal": distance of the adapted
    # decoder's output to black (saturates, with a zero gradient, once an attack fails).
    # "refusal+attacker": plus w * relu(tau - L_att) / tau, a hinge on the attacker's own
    # reconstruction MSE on held-out unsafe images, so the defender keeps pushing the attacker's
    # loss up to tau (about what scratch reaches after 100 strong steps) even where refusal holds.
    nft_objective: str = "refusal+attacker"
    nft_attacker_tau: float = 0.1
    nft_attacker_weight: float = 1.0
    second_order: bool = False  # full MAML for plain-SGD full-parameter attacks
    attacks: AttackSpaceConfig = field(default_factory=AttackSpaceConfig)
    # Probes: a real decoder fine-tuning attack (fixed seed) on the probe partition every `probe_every` steps.
    probe_every: int = 50
    probe_optimizer: str = "adam"
    probe_lr: float = 1e-4
    probe_steps: int = 100
    probe_batch: int = 16
    probe_max_grad_norm: float | None = None  # as unet.probe_max_grad_norm, for the decoder's probes
    min_benign_psnr: float = 31.0  # checkpoints below it are chosen only when none reaches it (1 dB over the bar)
    checkpoint_every: int = 25
    unet: UNetAlignConfig = field(default_factory=UNetAlignConfig)
    # Memory, for real checkpoints: recompute the trained UNet's and decoder's activations in the
    # backward pass instead of keeping them (about a third slower, far less activation memory),
    # and encode the feature bank's and probes' images one at a time, decode them 8 at a time. Mixed precision
    # comes from accelerate (`accelerate launch --mixed_precision bf16`): every training step
    # runs under its autocast.
    gradient_checkpointing: bool = False
    vae_slicing: bool = False
    # The UNet half's frozen teacher in "float32" or "bfloat16" (half its memory, a UNet's worth
    # at SD-1.5 widths: 1.6 GiB; its targets rounded to bf16). Training always runs in float32
    # weights; accelerate's mixed precision is separate.
    frozen_dtype: str = "float32"
    # Where the best checkpoint's weights wait until the end of a stage: "memory" (CPU memory) or
    # "disk" (a file in the run's work directory: one UNet's worth of CPU memory less).
    best_checkpoint: str = "memory"
    mark: MarkConfig = field(default_factory=MarkConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        if self.mark.enabled and ("unet" not in self.parts or self.unet.update == "text-encoder"):
            raise ConfigError("mark.enabled marks the text encoder for the UNet half: it needs --parts with unet "
                              "and unet.update full or lora (an aligned text encoder would train the marked rows)")
        if self.mark.enabled and self.distill.enabled:
            raise ConfigError("mark.enabled with distill.enabled is not supported: distillation trains a text "
                              "encoder of its own; turn one of them off")
        if self.distill.teacher is not None and not self.distill.enabled:
            raise ConfigError("distill.teacher is set but distill.enabled is false: enable distillation or drop "
                              "the teacher")
        if not self.parts or len(set(self.parts)) != len(self.parts) or set(self.parts) - set(PARTS):
            raise ConfigError(f"parts must be one or more of {', '.join(PARTS)} (each once), got "
                              f"{', '.join(self.parts) or 'none'}")
        if self.bank.unet_sources is None:
            # An alignment of the text encoder leaves no aligned UNet to take latents from.
            both = set(self.parts) == set(PARTS) and self.unet.update != "text-encoder"
            object.__setattr__(self, "bank", replace(self.bank, unet_sources=UNET_SOURCES if both else ("original",)))
        if set(self.bank.unet_sources) - {"original"} and set(self.parts) != set(PARTS):
            raise ConfigError("bank.unet_sources other than 'original' need both parts (--parts decoder,unet): "
                              "the decoder then learns from the aligned UNet's latents")
        if set(self.bank.unet_sources) - {"original"} and self.unet.update == "text-encoder":
            raise ConfigError("bank.unet_sources other than 'original' need an aligned UNet, and unet.update = "
                              "'text-encoder' keeps the original's: set bank.unet_sources = ['original']")
        if self.probe_detector not in DETECTORS:
            raise ConfigError(f"unknown probe_detector {self.probe_detector!r}; choose one of {', '.join(DETECTORS)}")
        if "unet" in self.parts and self.unet.gate == "class" and self.probe_detector != "glyphnet":
            raise ConfigError(f"unet.gate = 'class' compares GlyphNet's classes with the glyph world's labels; "
                              f"with probe_detector = {self.probe_detector!r} set unet.gate = 'fidelity'")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"unknown frozen_dtype {self.frozen_dtype!r}; choose one of {', '.join(FROZEN_DTYPES)}")
        if self.best_checkpoint not in ("memory", "disk"):
            raise ConfigError(f"best_checkpoint must be 'memory' or 'disk', got {self.best_checkpoint!r}")
        if self.cal_weighting not in CAL_WEIGHTINGS:
            raise ConfigError(f"unknown cal_weighting {self.cal_weighting!r}; "
                              f"choose one of {', '.join(CAL_WEIGHTINGS)}")
        if self.perceptual not in PERCEPTUAL:
            raise ConfigError(f"unknown perceptual network {self.perceptual!r}; choose one of {', '.join(PERCEPTUAL)}")
        if self.perceptual == "vgg19" and not self.vgg_weights:
            raise ConfigError("perceptual = 'vgg19' needs vgg_weights = path to torchvision's vgg19 weights")
        if unknown := {name for name, _ in self.attacks.objectives} - set(OBJECTIVES):
            raise ConfigError(f"unknown attacks.objectives {', '.join(sorted(unknown))}; choose from "
                              f"{', '.join(OBJECTIVES)}")
        if self.nft_objective not in ("refusal", "refusal+attacker"):
            raise ConfigError(f"nft_objective must be refusal or refusal+attacker, got {self.nft_objective!r}")
        if self.nft_attacker_tau <= 0 or self.nft_attacker_weight < 0:
            raise ConfigError("nft_attacker_tau must be positive and nft_attacker_weight not negative")
        if self.probe_optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown probe_optimizer {self.probe_optimizer!r}; "
                              f"choose one of {', '.join(OPTIMIZERS)}")
        check_max_grad_norm(self.probe_max_grad_norm, "probe_max_grad_norm")
        positive = ("batch_size", "query_batch", "stage1_steps", "probe_every", "probe_steps", "probe_batch",
                    "checkpoint_every")
        if bad := [k for k in positive if getattr(self, k) < 1]:
            raise ConfigError(f"{', '.join(bad)} must be at least 1")
        if self.stage2_steps < 0 or self.stage1_warmup < 0:
            raise ConfigError("stage2_steps and stage1_warmup must not be negative")
        weights = [k for k in self.__dataclass_fields__ if k.startswith(("stage1_w_", "stage2_w_"))]
        if bad := [k for k in weights if getattr(self, k) < 0]:
            raise ConfigError(f"{', '.join(bad)} must not be negative")
        if min(self.stage1_lr, self.stage2_lr, self.probe_lr) <= 0:
            raise ConfigError("stage1_lr, stage2_lr and probe_lr must be positive")


PRESETS: dict[str, dict] = {
    # Seconds on 2 CPU cores: a demonstration of the whole pipeline, not a usable protection.
    # Chosen on 2026-11-30 by protect time and the probes' numbers (docs/research-log.md, "A quick
    # preset of 4-6 minutes"): smaller batches and half the NFT steps of the earlier quick preset.
    "quick": {
        # With one part the decoder learns the original UNet's latents only; with both, also the
        # aligned UNet's (`BOTH_PARTS`). The attacked copy would cost the demo minutes.
        "bank": {"n_train": 192, "n_query": 64, "n_probe": 64, "sampler_steps": 15, "unet_sources": ["original"]},
        "batch_size": 24, "stage1_steps": 300, "stage1_lr": 5e-4, "stage1_warmup": 20, "stage2_steps": 30,
        "probe_every": 30, "probe_steps": 50,
        "attacks": {"inner_steps": [3, 8], "batch_sizes": [4, 16], "queries_per_attack": 2},
        "checkpoint_every": 50,
        # Nor the unknown-word term (17% of alignment's cost): the demo never fine-tunes on new words.
        "unet": {"w_unknown": 0.0, "n_train": 128, "n_query": 32, "n_probe": 16, "batch_size": 16,
                 "align_steps": 125, "align_warmup": 10, "align_lr": 3e-4, "nft_steps": 10, "probe_every": 10,
                 "probe_steps": 30, "probe_samples": 16, "probe_sampler_steps": 10, "checkpoint_every": 25,
                 "attacks": {"inner_steps": [2, 5], "batch_sizes": [4, 8], "queries_per_attack": 1}},
    },
    "full": {},
}
# A preset's settings for a run that protects both parts, under any config file's. The quick
# decoder that learns only the original UNet's latents renders the aligned UNet's refusals
# too light to count (17% refusals on glyph-quick against 100% with them). Its calibration
# weighted towards near-black benign images, at 5x the weight, with half the refusal weight on
# UNet latents, keeps glyphs on dark backgrounds (benign class on the glyph suite 83% -> 93%,
# docs/research-log.md, 2026-12-02).
BOTH_PARTS: dict[str, dict] = {"quick": {"bank": {"unet_sources": ["original", "aligned"]},
                                         "cal_weighting": "near-black", "stage1_w_cal": 10.0,
                                         "stage1_w_refuse_feat": 0.5}}


def parse_parts(text: str) -> tuple[str, ...]:
    """`--parts decoder,unet` as the config's tuple, checked."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts or len(set(parts)) != len(parts) or set(parts) - set(PARTS):
        raise ConfigError(f"--parts must be a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return parts


def load_config(preset: str = "full", path: str | Path | None = None, parts: str | None = None) -> ProtectConfig:
    """A preset (and its `BOTH_PARTS` settings when both parts are protected), overridden by a
    .toml / .yaml / .json file, then by `--parts`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    overrides = read_config_file(path) if path is not None else {}
    if parts is not None:
        overrides["parts"] = parse_parts(parts)
    chosen = overrides.get("parts", PARTS)  # checked by ProtectConfig; here only: are both parts on?
    if isinstance(chosen, (list, tuple)) and sorted(map(str, chosen)) == sorted(PARTS):
        values = merge(values, BOTH_PARTS.get(preset, {}))
    return build(ProtectConfig, merge(values, overrides), "protect")
