import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from patronus.models.train_base import BaseTrainConfig, train_base
from patronus.world import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.splits import render_split
from tests.conftest import MINI_CONFIG

MINI = BaseTrainConfig(
    n_images=128, vae_steps=4, vae_batch=8, unet_steps=4, unet_batch=8, unet_warmup=1, checkpoint_every=2,
    snapshot_every=2,
    model=MINI_CONFIG,
)


def _weights(pipe_dir: Path) -> dict[str, torch.Tensor]:
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    return {f"{n}.{k}": v for n in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, n).state_dict().items()}


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    full = train_base(tmp_path / "a", MINI)
    train_base(tmp_path / "b", MINI)
    # Simulate a run killed after step 2 of the UNet stage: drop everything written later.
    shutil.rmtree(tmp_path / "b" / "unet-checkpoints" / "checkpoint-4")
    shutil.rmtree(tmp_path / "b" / "pipeline")
    resumed = train_base(tmp_path / "b", MINI)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_are_refused(tmp_path):
    train_base(tmp_path / "a", MINI, stage="vae")
    other = BaseTrainConfig(**{**MINI.__dict__, "vae_lr": 1e-4})
    with pytest.raises(ValueError, match="different settings"):
        train_base(tmp_path / "a", other)


def test_classes_restrict_the_training_images_and_are_checked(monkeypatch, tmp_path):
    import patronus.models.train_base as tb

    seen = []

    def recording(split, n, resolution=32, start=0, classes=CLASS_NAMES):
        images, samples = render_split(split, n, resolution, start, classes)
        seen.extend(s.spec.cls for s in samples if split == "base-train")
        return images, samples

    monkeypatch.setattr(tb, "render_split", recording)
    benign = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    train_base(tmp_path / "benign", BaseTrainConfig(**{**MINI.__dict__, "classes": benign}))
    assert seen and set(seen) <= set(benign)
    with pytest.raises(ValueError, match="classes must name glyph classes.*bomb"):
        BaseTrainConfig(**{**MINI.__dict__, "classes": ("circle", "bomb")})
    with pytest.raises(ValueError, match="classes must name glyph classes"):
        BaseTrainConfig(**{**MINI.__dict__, "classes": ()})


def test_vae_from_reuses_that_models_vae(mini_pipeline, tmp_path):
    out = train_base(tmp_path / "r", BaseTrainConfig(**{**MINI.__dict__, "vae_from": str(mini_pipeline)}))
    assert not (tmp_path / "r" / "vae-checkpoints").exists()
    mine, theirs = _weights(out), _weights(mini_pipeline)
    assert all(torch.equal(mine[k], theirs[k].half().float()) for k in mine if k.startswith("vae."))
    with pytest.raises(ValueError, match="not found"):
        train_base(tmp_path / "x", BaseTrainConfig(**{**MINI.__dict__, "vae_from": str(tmp_path / "none")}))
    assert not (tmp_path / "x").exists()


def test_text_encoder_from_is_frozen_and_checked(mini_pipeline, tmp_path):
    out = train_base(tmp_path / "r", BaseTrainConfig(**{**MINI.__dict__, "text_encoder_from": str(mini_pipeline)}))
    mine, theirs = _weights(out), _weights(mini_pipeline)
    text = [k for k in mine if k.startswith("text_encoder.")]
    assert text and all(torch.equal(mine[k], theirs[k]) for k in text)
    assert not all(torch.equal(mine[k], theirs[k].half().float()) for k in mine if k.startswith("unet."))
    wide = BaseTrainConfig(**{**MINI.__dict__, "text_encoder_from": str(mini_pipeline),
                              "model": replace(MINI_CONFIG, text_hidden=2 * MINI_CONFIG.text_hidden)})
    with pytest.raises(ValueError, match="text_hidden"):
        train_base(tmp_path / "w", wide)
    assert not (tmp_path / "w").exists()
    other = shutil.copytree(mini_pipeline, tmp_path / "other-vocab")
    encoder = CLIPTextModel.from_pretrained(other / "text_encoder")
    encoder.resize_token_embeddings(encoder.config.vocab_size + 1)
    encoder.save_pretrained(other / "text_encoder")
    with pytest.raises(ValueError, match="tokens"):
        train_base(tmp_path / "v", BaseTrainConfig(**{**MINI.__dict__, "text_encoder_from": str(other)}))
    assert not (tmp_path / "v").exists()
