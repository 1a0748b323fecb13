import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from patronus.defenses.patronus.config import load_config
from patronus.defenses.patronus.distill import CROSS_ATTENTION_KV, mix_fresh, unet_batch
from patronus.defenses.patronus.protect import protect
from patronus.errors import ConfigError
from patronus.provenance import weight_hashes

TINY_DISTILL = {
    "bank": {"n_train": 16, "n_query": 8, "n_probe": 8, "sampler_steps": 2},
    "unet": {"n_train": 16, "n_query": 8, "n_probe": 8},
    "distill": {"enabled": True, "n_prompts": 16, "n_images": 24, "sampler_steps": 3, "unet_steps": 4, "unet_batch": 16,
                "decoder_steps": 4, "decoder_batch": 8, "checkpoint_every": 2, "warmup": 1},
}


def _cfg(tmp_path, teacher, **distill):
    values = json.loads(json.dumps(TINY_DISTILL))
    values["distill"] |= {"teacher": str(teacher), **distill}
    path = tmp_path / "distill.json"
    path.write_text(json.dumps(values))
    return load_config("full", path)


def test_mixing_with_a_fresh_initialisation_interpolates_every_weight():
    a, fresh = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = a.weight.detach().clone()
    mix_fresh(a, fresh, 0.0)
    assert torch.equal(a.weight, before)
    mix_fresh(a, fresh, 0.25)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * fresh.weight)
    mix_fresh(a, fresh, 1.0)
    assert torch.equal(a.weight, fresh.weight) and torch.equal(a.bias, fresh.bias)


@pytest.mark.parametrize("bad, message", [
    ({"alpha": 1.5}, "alpha must lie in"), ({"unet_batch": 24}, "multiple of 16"),
    ({"text_encoder": "fresh"}, "distil or keep"), ({"enabled": False}, "distill.enabled is false"),
    ({"unet": "fresh"}, "distil, keep or cross-attention"), ({"unet": "keep"}, "needs distill.student"),
    ({"unet": "cross-attention"}, "needs distill.student"),
    ({"unet": "keep", "student": "patronus-tiny", "text_encoder": "keep"}, "needs distill.student"),
])
def test_bad_distill_settings_are_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, "patronus-tiny-protected", **bad)


class _Data:
    """UNetData's fields, with unsafe image latents that would show up as NaN wherever used."""

    def __init__(self):
        n, k = 8, 5
        self.scale = 1.0
        self.benign_mean, self.benign_std = torch.randn(n, 4, 8, 8), torch.ones(n, 4, 8, 8) * 0.1
        self.unsafe_mean, self.unsafe_std = torch.full((n, 4, 8, 8), float("nan")), torch.ones(n, 4, 8, 8)
        self.traj_benign, self.traj_unsafe = torch.randn(k, n, 4, 8, 8), torch.randn(k, n, 4, 8, 8)
        self.timesteps = torch.arange(k) * 200 + 1
        self.ids = {kind: torch.arange(n * 3).view(n, 3) for kind in ("benign", "unknown", "unsafe")}
        self.ids["empty"] = torch.zeros(1, 3, dtype=torch.long)
        self.hidden = {kind: torch.randn(len(v), 3, 2) for kind, v in self.ids.items()}


def test_unsafe_images_are_never_inputs_unless_asked_for():
    data, scheduler = _Data(), DDPMScheduler()
    x, t, ids, hidden = unet_batch(data, scheduler, 32, False, 0.5, torch.Generator().manual_seed(0))
    assert x.shape == (32, 4, 8, 8) and len(t) == len(ids) == len(hidden) == 32
    assert torch.isfinite(x).all()
    x, *_ = unet_batch(data, scheduler, 32, True, 0.5, torch.Generator().manual_seed(0))
    assert torch.isnan(x).any()  # the switch does feed them: the check above is not vacuous


def test_distilling_a_teacher_replaces_unet_text_encoder_and_decoder(mini_pipeline, tmp_path):
    cfg = _cfg(tmp_path, mini_pipeline)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert info["parts"] == ["distill"]
    assert info["changed_weight_files"] == ["text_encoder/model.safetensors",
                                            "unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors"]
    record = info["distill"]
    assert record["alpha"] == 1.0 and len(record["unet"]["losses"]) == 4 and len(record["decoder"]["losses"]) == 4
    teacher, student = (StableDiffusionPipeline.from_pretrained(p) for p in (mini_pipeline, tmp_path / "out"))
    for k, v in teacher.vae.encoder.state_dict().items():  # the latent space stays the teacher's
        assert torch.equal(v, student.vae.encoder.state_dict()[k])
    image = student("a red star", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_a_kept_text_encoder_is_the_teachers(mini_pipeline, tmp_path):
    cfg = _cfg(tmp_path, mini_pipeline, text_encoder="keep", decoder=False)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert info["changed_weight_files"] == ["unet/diffusion_pytorch_model.safetensors"]


def test_a_resumed_distillation_ends_with_the_same_weights(mini_pipeline, tmp_path):
    cfg = _cfg(tmp_path, mini_pipeline)
    protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    for stage in ("unet", "decoder"):  # killed after step 2 of each stage: drop the final checkpoints
        ckpts = sorted((tmp_path / "wb" / "distill" / stage).glob("checkpoint-*"), key=lambda c: int(c.name[11:]))
        assert ckpts[-1].name == "checkpoint-4"
        shutil.rmtree(ckpts[-1])
        # The killed session's training, made long enough that the resumed session cannot hide it.
        state_file = ckpts[-2] / "state.json"
        state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"worked_seconds": 1000.0}))
    info = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    assert weight_hashes(tmp_path / "a") == weight_hashes(tmp_path / "b") == info["weight_files_sha256"]
    record = info["distill"]
    assert record["unet"]["seconds"] > 1000.0 and record["decoder"]["seconds"] > 1000.0
    assert info["timing"]["total_seconds"] > record["timing"]["total_seconds"] > 2000.0


def test_the_data_term_trains_on_benign_images_and_changes_the_student(mini_pipeline, tmp_path):
    plain = protect(str(mini_pipeline), tmp_path / "a", _cfg(tmp_path, mini_pipeline, decoder=False), tmp_path / "wa")
    cfg = _cfg(tmp_path, mini_pipeline, decoder=False, text_encoder="keep", data_batch=8)
    kept = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb")
    with_data = protect(str(mini_pipeline), tmp_path / "c", _cfg(tmp_path, mini_pipeline, decoder=False, data_batch=8),
                        tmp_path / "wc")
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert with_data["weight_files_sha256"][unet] != plain["weight_files_sha256"][unet]
    assert kept["changed_weight_files"] == [unet]
    with pytest.raises(ConfigError, match="must not be negative"):
        _cfg(tmp_path, mini_pipeline, data_batch=-1)



def _other(mini_pipeline, path, **unet_config):
    """The mini pipeline with a UNet drawn from another seed (and `unet_config` changed)."""
    pipe = StableDiffusionPipeline.from_pretrained(mini_pipeline)
    torch.manual_seed(1)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, **unet_config})
    pipe.save_pretrained(path)
    return path


def test_a_student_model_is_the_fresh_end_of_the_mix(mini_pipeline, tmp_path):
    """alpha = 1 with `student` set and a zero learning rate: the student's UNet is that model's."""
    other = _other(mini_pipeline, tmp_path / "other")
    cfg = _cfg(tmp_path, mini_pipeline, student=str(other), alpha=1.0, decoder=False, unet_steps=1)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert info["distill"]["student"] == str(other)
    given, out = (StableDiffusionPipeline.from_pretrained(p) for p in (other, tmp_path / "out"))
    for k, v in given.unet.state_dict().items():  # one step inside the warm-up: learning rate 0
        assert torch.equal(v, out.unet.state_dict()[k]), k


def test_a_student_of_another_architecture_is_refused_before_any_work(mini_pipeline, tmp_path):
    other = _other(mini_pipeline, tmp_path / "other", layers_per_block=2)
    with pytest.raises(ConfigError, match="differs in architecture"):
        protect(str(mini_pipeline), tmp_path / "out", _cfg(tmp_path, mini_pipeline, student=str(other)),
                tmp_path / "work")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_kept_text_encoder_with_a_student_model_is_that_models(mini_pipeline, tmp_path):
    other = _other(mini_pipeline, tmp_path / "other")
    text_encoder = StableDiffusionPipeline.from_pretrained(other).text_encoder
    torch.manual_seed(2)
    for p in text_encoder.parameters():  # unlike the teacher's, so that keeping the wrong one shows
        p.data.add_(torch.randn_like(p) * 0.1)
    text_encoder.save_pretrained(other / "text_encoder")
    cfg = _cfg(tmp_path, mini_pipeline, student=str(other), text_encoder="keep", decoder=False)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert "unet/diffusion_pytorch_model.safetensors" in info["changed_weight_files"]
    assert weight_hashes(tmp_path / "out")["text_encoder/model.safetensors"] == \
        weight_hashes(other)["text_encoder/model.safetensors"]


def test_a_kept_unet_is_the_student_models_and_only_the_text_encoder_learns(mini_pipeline, tmp_path):
    other = _other(mini_pipeline, tmp_path / "other")  # its UNet is not the teacher's
    cfg = _cfg(tmp_path, mini_pipeline, student=str(other), unet="keep", decoder=False)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert "text_encoder/model.safetensors" in info["changed_weight_files"]
    out, start = weight_hashes(tmp_path / "out"), weight_hashes(other)
    assert out["unet/diffusion_pytorch_model.safetensors"] == start["unet/diffusion_pytorch_model.safetensors"]
    assert out["text_encoder/model.safetensors"] != start["text_encoder/model.safetensors"]


def test_a_cross_attention_student_trains_only_the_prompts_keys_and_values(mini_pipeline, tmp_path):
    other = _other(mini_pipeline, tmp_path / "other")
    cfg = _cfg(tmp_path, mini_pipeline, student=str(other), unet="cross-attention", decoder=False)
    protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    out = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    start = UNet2DConditionModel.from_pretrained(other / "unet").state_dict()
    moved = {k for k in start if not torch.equal(out[k], start[k])}
    assert moved and all(k.endswith(CROSS_ATTENTION_KV) for k in moved)
