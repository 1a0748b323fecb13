import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import run_attack


def _weights(path, component):
    return getattr(StableDiffusionPipeline.from_pretrained(path), component).state_dict()


@pytest.mark.parametrize("kind,changed,unchanged", [
    ("unet-full", ["unet"], ["vae", "text_encoder"]),
    ("unet-lora", ["unet"], ["vae", "text_encoder"]),
    ("decoder-full", ["vae"], ["unet", "text_encoder"]),
    ("decoder-lora", ["vae"], ["unet", "text_encoder"]),
    ("joint", ["unet", "vae", "text_encoder"], []),
    ("unet-text-encoder", ["unet", "text_encoder"], ["vae"]),
    ("text-encoder", ["text_encoder"], ["unet", "vae"]),
])
def test_each_kind_changes_only_its_components(mini_pipeline, tmp_path, kind, changed, unchanged):
    s = AttackConfig(kind=kind, optimizer="adam", lr=1e-3, steps=3, rank=4, batch_size=4, save_at=(1, 3))
    dirs = run_attack(str(mini_pipeline), s, tmp_path / "out", progress=False)
    assert [d.name for d in dirs] == ["step-1", "step-3"]
    for component in changed:
        before, after = _weights(mini_pipeline, component), _weights(dirs[-1], component)
        assert before.keys() == after.keys()  # LoRA fused: a plain diffusers checkpoint
        assert any(not torch.equal(before[k], after[k]) for k in before), component
    for component in unchanged:
        before, after = _weights(mini_pipeline, component), _weights(dirs[-1], component)
        assert all(torch.equal(before[k], after[k]) for k in before), component
    if kind == "unet-lora":  # plain diffusers applies the adapter and gets the fused UNet
        fused, base = (StableDiffusionPipeline.from_pretrained(p) for p in (dirs[-1], mini_pipeline))
        base.load_lora_weights(dirs[-1] / "lora")
        torch.manual_seed(0)
        c = base.unet.config
        x, t = torch.randn(2, c.in_channels, c.sample_size, c.sample_size), torch.tensor([10, 500])
        hidden = torch.randn(2, 16, c.cross_attention_dim)
        with torch.no_grad():
            assert torch.allclose(base.unet(x, t, hidden).sample, fused.unet(x, t, hidden).sample, atol=1e-5)
    if kind == "decoder-lora":
        assert (dirs[-1] / "lora" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "attack.json").read_text())["kind"] == kind


def test_swap_decoder(mini_pipeline, tmp_path):
    other = tmp_path / "other"
    run_attack(str(mini_pipeline), AttackConfig(kind="decoder-full", lr=1e-2, steps=2, batch_size=4, save_at=(2,)),
               other, progress=False)
    dirs = run_attack(str(mini_pipeline), AttackConfig(kind="swap-decoder", swap_from=str(other / "step-2")),
                      tmp_path / "swap", progress=False)
    swapped = _weights(dirs[0], "vae")
    donor = _weights(other / "step-2", "vae")
    assert all(torch.equal(swapped[k], donor[k]) for k in donor)
    # Only the decoder: the model keeps its own encoder even when the donor's differs.
    donor_pipe = StableDiffusionPipeline.from_pretrained(other / "step-2")
    with torch.no_grad():
        for p in donor_pipe.vae.encoder.parameters():
            p.add_(0.1)
    donor_pipe.save_pretrained(tmp_path / "donor")
    dirs = run_attack(str(mini_pipeline), AttackConfig(kind="swap-decoder", swap_from=str(tmp_path / "donor"),
                                                         swap_part="decoder"), tmp_path / "swap-dec", progress=False)
    swapped, ours = _weights(dirs[0], "vae"), _weights(mini_pipeline, "vae")
    assert all(torch.equal(swapped[k], (ours if k.startswith(("encoder.", "quant_conv.")) else donor)[k])
               for k in swapped)
    # ...optionally followed by a UNet attack, which starts from the swapped-in VAE.
    dirs = run_attack(str(mini_pipeline), AttackConfig(kind="swap-decoder", swap_from=str(other / "step-2"),
                                                         then="unet-full", steps=1, batch_size=4, save_at=(1,)),
                      tmp_path / "swap-then", progress=False)
    swapped = _weights(dirs[0], "vae")
    assert all(torch.equal(swapped[k], donor[k]) for k in donor)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(dirs[0], "unet").values(),
                                                      _weights(mini_pipeline, "unet").values()))


def test_swap_decoder_refuses_a_vae_of_another_family(mini_pipeline, tmp_path):
    from diffusers import AutoencoderKL

    other = tmp_path / "other"
    pipe = StableDiffusionPipeline.from_pretrained(mini_pipeline)
    pipe.vae = AutoencoderKL.from_config({**pipe.vae.config, "scaling_factor": 0.5})
    pipe.save_pretrained(other)
    with pytest.raises(ValueError, match="scaling_factor"):
        run_attack(str(mini_pipeline), AttackConfig(kind="swap-decoder", swap_from=str(other)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad,needle", [
    (dict(kind="prompt-tuning"), "unknown attack kind"),
    (dict(kind="unet-full", optimizer="lion"), "unknown optimizer"),
    (dict(kind="swap-decoder"), "--from"),
    (dict(kind="unet-full", steps=10, save_at=(20,)), "--save-at"),
    (dict(kind="unet-lora", rank=0), "--rank"),
    (dict(kind="unet-full", schedule="cosine"), "unknown learning-rate schedule 'cosine'"),
    (dict(kind="unet-full", freeze_text_encoder=True), "--freeze-text-encoder applies to .*joint.*unet-full does not"),
    (dict(kind="swap-decoder", swap_from="x", then="unet-full", freeze_text_encoder=True), "--freeze-text-encoder"),
    (dict(kind="text-encoder", freeze_text_encoder=True), "leaves text-encoder nothing to train"),
    (dict(kind="none", max_grad_norm=1.0), "--max-grad-norm clips .*none fine-tunes no weights"),
    (dict(kind="unet-full", max_grad_norm=0.0), "--max-grad-norm must be a positive"),
    (dict(kind="unet-full", max_grad_norm=float("inf")), "--max-grad-norm must be a positive"),
    (dict(kind="unet-full", max_grad_norm=True), "--max-grad-norm must be a positive"),
])
def test_bad_settings(mini_pipeline, tmp_path, bad, needle):
    with pytest.raises(ValueError, match=needle):
        run_attack(str(mini_pipeline), AttackConfig(**bad), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unet_attack_follows_the_prediction_type(mini_pipeline, tmp_path):
    import shutil

    from patronus.attacks.weights.finetune import AttackError

    s = AttackConfig(kind="unet-full", lr=1e-3, steps=1, batch_size=4, save_at=(1,))
    for prediction, ok in (("v_prediction", True), ("sample", False)):
        model = tmp_path / prediction
        shutil.copytree(mini_pipeline, model)
        config = model / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": prediction}))
        if ok:
            assert run_attack(str(model), s, tmp_path / f"out-{prediction}", progress=False)
        else:
            with pytest.raises(AttackError, match="predicts sample"):
                run_attack(str(model), s, tmp_path / f"out-{prediction}", progress=False)
            assert not (tmp_path / f"out-{prediction}").exists()


def test_the_step_schedule_divides_the_lr_by_ten_at_each_quarter():
    from patronus.attacks.weights.decoder import DecoderAttackConfig
    from patronus.attacks.weights.unet import UNetAttackConfig
    from patronus.errors import ConfigError
    from patronus.training import make_lr_schedule, step_milestones

    assert step_milestones(2000) == [500, 1000, 1500] and step_milestones(2) == [1, 1] and step_milestones(1) == []
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=1.0, momentum=0.9)
    assert make_lr_schedule("constant", opt, 8) is None  # the optimizer is left as it was built
    schedule = make_lr_schedule("step", opt, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    for cfg in (UNetAttackConfig, DecoderAttackConfig):  # the in-memory attacks take it too
        assert cfg(schedule="step").schedule == "step"
        with pytest.raises(ConfigError, match="unknown learning-rate schedule"):
            cfg(schedule="cosine")


def test_a_step_schedule_changes_the_run_only_after_its_first_decay(mini_pipeline, tmp_path):
    runs = {}
    for schedule in ("constant", "step"):
        s = AttackConfig(kind="unet-full", optimizer="sgd", lr=1e-2, schedule=schedule, steps=4, batch_size=2,
                         save_at=(1, 4))
        runs[schedule] = run_attack(str(mini_pipeline), s, tmp_path / schedule, progress=False)
    (c1, c4), (s1, s4) = ([_weights(d, "unet") for d in runs[k]] for k in ("constant", "step"))
    assert all(torch.equal(c1[k], s1[k]) for k in c1)  # step 1 runs at the full rate under both
    assert any(not torch.equal(c4[k], s4[k]) for k in c4)  # decayed after steps 1, 2 and 3
    assert json.loads((tmp_path / "step" / "attack.json").read_text())["schedule"] == "step"


@pytest.mark.parametrize("kind", ["unet-full", "joint"])
def test_max_grad_norm_clips_the_step_as_diffusers_scripts_do(mini_pipeline, tmp_path, kind):
    """One SGD step moves the weights by lr x the gradient; clipped to a norm far under the
    gradient's, the move's norm over every trained component is lr x that norm exactly."""
    parts = ("unet", "text_encoder", "vae")
    before = {c: _weights(mini_pipeline, c) for c in parts}
    moved = {}
    for name, clip in (("plain", None), ("clipped", 1e-3)):
        s = AttackConfig(kind=kind, optimizer="sgd", lr=1.0, steps=1, batch_size=2, save_at=(1,),
                         max_grad_norm=clip)
        [ckpt] = run_attack(str(mini_pipeline), s, tmp_path / name, progress=False)
        after = {c: _weights(ckpt, c) for c in parts}
        moved[name] = torch.sqrt(sum(((after[c][k].double() - before[c][k].double()) ** 2).sum()
                                     for c in parts for k in before[c])).item()
    assert moved["plain"] > 10 * 1e-3  # the unclipped gradient is well over the clip
    assert moved["clipped"] == pytest.approx(1e-3, rel=1e-2)  # float32 weights round the move a little
    assert json.loads((tmp_path / "clipped" / "attack.json").read_text())["max_grad_norm"] == 1e-3


def test_joint_with_a_frozen_text_encoder_trains_the_unet_and_decoder_only(mini_pipeline, tmp_path):
    s = AttackConfig(kind="joint", lr=1e-3, steps=2, batch_size=2, save_at=(2,), freeze_text_encoder=True)
    [ckpt] = run_attack(str(mini_pipeline), s, tmp_path / "out", progress=False)
    for component, trained in (("unet", True), ("vae", True), ("text_encoder", False)):
        before, after = _weights(mini_pipeline, component), _weights(ckpt, component)
        assert any(not torch.equal(before[k], after[k]) for k in before) == trained, component


def test_the_parts_of_joint_start_from_the_same_batch_and_noise(mini_pipeline, tmp_path):
    """`unet-text-encoder` and `text-encoder` split `joint` into its parts: with one seed, every
    kind on the denoising loss draws the same first batch and noise, so its first loss (before any
    weight moves) is the same, and `joint`'s differs only by the decoder's reconstruction term."""
    first = {}
    for kind in ("unet-full", "unet-text-encoder", "text-encoder", "joint"):
        s = AttackConfig(kind=kind, lr=1e-3, steps=1, batch_size=4, save_at=(1,), seed=3)
        run_attack(str(mini_pipeline), s, tmp_path / kind, progress=False)
        first[kind] = json.loads((tmp_path / kind / "losses.json").read_text())["loss_per_step"][0]
    assert first["unet-text-encoder"] == first["text-encoder"] == first["unet-full"]
    assert first["joint"] > first["unet-full"]
