"""The UNet half of `patronus protect` on a miniature random pipeline."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from patronus.attacks.weights.unet import noised_batch
from patronus.defenses.patronus.align import Aligner, align_unet
from patronus.defenses.patronus.config import load_config
from patronus.defenses.patronus.protect import protect
from patronus.errors import ConfigError
from patronus.evaluation.metrics import is_refusal

UNET_RUN = {
    "parts": ["unet"],
    "unet": {"n_train": 8, "n_query": 4, "n_probe": 4, "batch_size": 4, "query_batch": 2, "align_steps": 3,
             "align_warmup": 1, "nft_steps": 4, "probe_every": 2, "probe_steps": 2, "probe_batch": 2,
             "probe_samples": 2, "probe_sampler_steps": 2, "checkpoint_every": 2,
             "attacks": {"inner_steps": [1, 2], "batch_sizes": [2, 2], "queries_per_attack": 1}},
}


def _cfg(tmp_path, **unet):
    run = json.loads(json.dumps(UNET_RUN))
    run["unet"].update(unet)
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(run))
    return load_config("quick", path)


def _unet(path):
    return StableDiffusionPipeline.from_pretrained(path).unet.state_dict()


@pytest.fixture(scope="module")
def plain(mini_pipeline, tmp_path_factory):
    """One run of UNET_RUN, read (never written) by every test that compares with it."""
    tmp = tmp_path_factory.mktemp("plain")
    return protect(str(mini_pipeline), tmp / "out", _cfg(tmp), tmp / "work"), tmp / "out"


def test_unet_part_changes_only_the_unet_and_records_its_probes(mini_pipeline, plain):
    info, out = plain
    assert info["parts"] == ["unet"] and "decoder" not in info
    assert info["changed_weight_files"] == ["unet/diffusion_pytorch_model.safetensors"]
    assert [p["step"] for p in info["unet"]["probes"]] == [2, 4]
    assert info["unet"]["chosen_checkpoint"]["step"] in (2, 4)
    assert len(info["unet"]["losses"]["stage1"]) == 3 and len(info["unet"]["losses"]["stage2"]) == 4
    original, protected = _unet(mini_pipeline), _unet(out)
    assert any(not torch.equal(original[k], protected[k]) for k in original)


def test_unet_resume_gives_the_same_weights(mini_pipeline, tmp_path):
    cfg = _cfg(tmp_path)
    protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    # Killed after stage 2's step-2 checkpoint: drop the step-4 one; and stage 1 mid-way: redo it from step 2.
    stage2 = sorted((tmp_path / "wb" / "unet" / "stage2").glob("checkpoint-*"))
    shutil.rmtree(stage2[-1])
    info = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    assert [p["step"] for p in info["unet"]["probes"]] == [2, 4]
    a, b = _unet(tmp_path / "a"), _unet(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("stage1-unet.safetensors", "stage1-unet.json"):
        (tmp_path / "wb" / "unet" / f).unlink()
    shutil.rmtree(tmp_path / "wb" / "unet" / "stage2")
    stage1 = sorted((tmp_path / "wb" / "unet" / "stage1").glob("checkpoint-*"))
    assert [c.name for c in stage1] == ["checkpoint-1000002"]  # of 3 steps: resumes inside stage 1
    info = protect(str(mini_pipeline), tmp_path / "c", cfg, tmp_path / "wb", resume=True)
    c = _unet(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_anchored_nft_resumes_from_its_checkpointed_anchor(mini_pipeline, plain, tmp_path):
    # Anchors at outer steps 0 and 3; the kill leaves the step-2 checkpoint, whose anchor (step 0's) must come back.
    cfg = _cfg(tmp_path, nft_anchor_every=3, nft_anchor_steps=2)
    whole = protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    stage2 = sorted((tmp_path / "wb" / "unet" / "stage2").glob("checkpoint-*"))
    shutil.rmtree(stage2[-1])
    resumed = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    # Step 2's loss holds the NFT term of the restored anchor; the output may be step 2's checkpoint.
    assert resumed["unet"]["losses"]["stage2"] == whole["unet"]["losses"]["stage2"]
    a, b = _unet(tmp_path / "a"), _unet(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    unanchored = _unet(plain[1])
    assert any(not torch.equal(a[k], unanchored[k]) for k in a)  # the anchor moved the simulated attacks


def test_implicit_nft_trains_the_unet(mini_pipeline, plain, tmp_path):
    info = protect(str(mini_pipeline), tmp_path / "a", _cfg(tmp_path, nft_implicit_iters=2), tmp_path / "wa")
    assert len(info["unet"]["losses"]["stage2"]) == 4
    # Stage 1 is the same; the damped NFT gradient changes every stage-2 step from the first.
    assert info["unet"]["losses"]["stage1"] == plain[0]["unet"]["losses"]["stage1"]
    assert info["unet"]["losses"]["stage2"] != plain[0]["unet"]["losses"]["stage2"]


def test_several_attacks_per_step_average_their_gradients(mini_pipeline, plain, tmp_path):
    info = protect(str(mini_pipeline), tmp_path / "a", _cfg(tmp_path, nft_attacks_per_step=3), tmp_path / "wa")
    assert info["unet"]["losses"]["stage1"] == plain[0]["unet"]["losses"]["stage1"]
    # The first attack of each step is plain's; the other two change the averaged NFT gradient.
    assert info["unet"]["losses"]["stage2"] != plain[0]["unet"]["losses"]["stage2"]
    assert 3 <= info["unet"]["timing"]["mean_inner_steps"] <= 6  # 3 attacks of 1-2 steps each (plain: 1 of 1-2)


def test_lora_alignment_is_merged_into_a_plain_unet(mini_pipeline, tmp_path):
    info = protect(str(mini_pipeline), tmp_path / "out", _cfg(tmp_path, update="lora", lora_rank=2, nft_steps=0),
                   tmp_path / "work")
    assert [p["step"] for p in info["unet"]["probes"]] == [0]
    protected = _unet(tmp_path / "out")
    assert not any("lora" in k for k in protected) and protected.keys() == _unet(mini_pipeline).keys()
    original = _unet(mini_pipeline)
    assert any(not torch.equal(original[k], protected[k]) for k in original if "attn" in k)


def test_a_lora_alignment_on_the_attention_projections_leaves_every_other_weight(mini_pipeline, tmp_path):
    protect(str(mini_pipeline), tmp_path / "out", _cfg(tmp_path, update="lora", lora_rank=2, nft_steps=0,
                                                      lora_targets=["to_q", "to_k", "to_v", "to_out.0"]),
            tmp_path / "work")
    original, protected = _unet(mini_pipeline), _unet(tmp_path / "out")
    moved = {k for k in original if not torch.equal(original[k], protected[k])}
    assert moved and all(re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", k) for k in moved)


def test_a_lora_probe_trains_the_same_unet_and_probes_another_attacker(mini_pipeline, plain, tmp_path):
    """The probe only chooses among checkpoints: the losses stay plain's, the probes' numbers are a LoRA attacker's."""
    info = protect(str(mini_pipeline), tmp_path / "a", _cfg(tmp_path, probe_lora_rank=2), tmp_path / "wa")
    assert info["unet"]["losses"] == plain[0]["unet"]["losses"]
    probes, plain_probes = info["unet"]["probes"], plain[0]["unet"]["probes"]
    assert [p["step"] for p in probes] == [2, 4]
    assert [p["unsafe_before"] for p in probes] == [p["unsafe_before"] for p in plain_probes]
    assert [p["attacker_loss_after_probe"] for p in probes] != [p["attacker_loss_after_probe"] for p in plain_probes]


def test_the_aligned_unet_leaves_the_half_without_gradients(mini_pipeline, tmp_path):
    """The decoder half keeps the aligned UNet for its bank: no UNet-sized gradient may ride along."""
    aligned, _ = align_unet(str(mini_pipeline), _cfg(tmp_path), tmp_path / "work", resume=False)
    assert list(aligned) == ["unet"]
    assert all(p.grad is None and not p.requires_grad for p in aligned["unet"].parameters())


def test_lora_targets_that_name_no_module_are_refused_before_the_work_folder_is_made(mini_pipeline, tmp_path):
    cfg = _cfg(tmp_path, update="lora", lora_rank=2, nft_steps=0, lora_targets=["to_q", "to_qq"])
    with pytest.raises(ConfigError, match="no module named to_qq"):
        protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_benign_lora_alongside_the_empty_refusal_changes_the_unet_and_resumes_to_the_same_weights(
        mini_pipeline, tmp_path):
    """`unet.w_follow`: the benign LoRA (restarted every 2 steps, so a resume at step 2 starts a
    fresh one and step 3 continues it) is kept in the checkpoint; a resumed run ends bit for bit."""
    er = {"target": "empty-refusal", "nft_steps": 0, "w_unknown": 1.0, "unknown_fresh": True,
          "follow_rank": 2, "follow_batch": 2, "follow_lr": 0.1}  # a LoRA that moves in 2 steps
    cfg = _cfg(tmp_path, **er, w_follow=1e3, follow_reset_every=2, align_steps=4)
    without = protect(str(mini_pipeline), tmp_path / "off", _cfg(tmp_path, **er, align_steps=4), tmp_path / "w0")
    whole = protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    assert whole["unet"]["losses"]["stage1"] != without["unet"]["losses"]["stage1"]
    off, on = _unet(tmp_path / "off"), _unet(tmp_path / "a")  # the term's gradient reaches the UNet
    assert any(not torch.equal(off[k], on[k]) for k in off)
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    for name in ("stage1-unet.safetensors", "stage1-unet.json"):
        (tmp_path / "wb" / "unet" / name).unlink()
    stage1 = sorted((tmp_path / "wb" / "unet" / "stage1").glob("checkpoint-*"))
    shutil.rmtree(stage1[-1])  # killed after step 2: the LoRA of steps 2-3 is redone
    resumed = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    assert resumed["unet"]["losses"]["stage1"] == whole["unet"]["losses"]["stage1"]
    a, b = _unet(tmp_path / "a"), _unet(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_benign_lora_resumed_mid_life_continues_its_adam_state(mini_pipeline, tmp_path):
    cfg = _cfg(tmp_path, target="empty-refusal", nft_steps=0, w_follow=1e3, follow_rank=2, follow_batch=2,
               follow_lr=0.1, follow_reset_every=10, align_steps=4)
    protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    for name in ("stage1-unet.safetensors", "stage1-unet.json"):
        (tmp_path / "wb" / "unet" / name).unlink()
    stage1 = sorted((tmp_path / "wb" / "unet" / "stage1").glob("checkpoint-*"))
    shutil.rmtree(stage1[-1])  # resumes at step 2 with a LoRA two steps old
    protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    a, b = _unet(tmp_path / "a"), _unet(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_text_encoder_alignment_leaves_the_unet_bit_for_bit(mini_pipeline, tmp_path):
    """`unet.update = "text-encoder"`: the refusal is learned by the text encoder alone, through
    the frozen UNet, so the shipped UNet is the original's; a resumed run ends at the same weights."""
    cfg = _cfg(tmp_path, update="text-encoder", nft_steps=0, w_unknown=1.0, unknown_fresh=True)
    info = protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    assert info["changed_weight_files"] == ["text_encoder/model.safetensors"]
    assert [p["step"] for p in info["unet"]["probes"]] == [0] and len(info["unet"]["losses"]["stage1"]) == 3
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    for name in ("stage1-text_encoder.safetensors", "stage1-unet.json"):
        (tmp_path / "wb" / "unet" / name).unlink()
    stage1 = sorted((tmp_path / "wb" / "unet" / "stage1").glob("checkpoint-*"))
    assert [c.name for c in stage1] == ["checkpoint-1000002"]  # of 3 steps: resumes inside stage 1
    protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    te = [StableDiffusionPipeline.from_pretrained(tmp_path / d).text_encoder.state_dict() for d in ("a", "b")]
    assert all(torch.equal(te[0][k], te[1][k]) for k in te[0])


@pytest.mark.parametrize("aligner", [{"update": "text-encoder", "nft_steps": 0, "w_unknown": 1.0}], indirect=True)
def test_a_text_encoder_alignment_trains_through_the_frozen_unet(aligner):
    aligner.pipe.text_encoder.requires_grad_(True)
    terms = aligner.terms(torch.Generator().manual_seed(0))
    aligner.loss(terms).backward()
    assert all(p.grad is None for p in aligner.unet.parameters())
    assert sum(p.grad.abs().sum() for p in aligner.pipe.text_encoder.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in aligner.original_text_encoder.parameters())


@pytest.fixture()
def aligner(mini_pipeline, tmp_path, request):
    from accelerate import Accelerator

    return Aligner(str(mini_pipeline), _cfg(tmp_path, **getattr(request, "param", {})), Accelerator())


@pytest.mark.parametrize("aligner", [{}, {"refusal_space": "eps"}], indirect=True, ids=["x0", "eps"])
def test_black_target_implies_the_black_latent(aligner):
    g = torch.Generator().manual_seed(0)
    part = aligner.data["train", "unsafe"]
    x_t, t, hidden = aligner.refusal_inputs(part, torch.arange(4), g)
    target = aligner.refusal_target(x_t, t, hidden)
    abar = aligner.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x_t - (1 - abar).sqrt() * target) / abar.sqrt()  # the clean latent an epsilon prediction implies
    torch.testing.assert_close(x0, aligner.x0_refusal.expand_as(x0), atol=1e-3, rtol=1e-3)
    weights = aligner.snr_weight(t).flatten()
    assert (weights > 0).all() and (weights <= 1 + 1e-6).all()
    assert aligner.refusal_distance(target, target, x_t, t).item() == 0
    assert aligner.refusal_distance(target + 0.1, target, x_t, t).item() > 0
    if aligner.u.refusal_space == "eps":  # unweighted, a prediction 0.1 off everywhere is 0.01 away
        aligner.u = dataclasses.replace(aligner.u, refusal_min_snr=False)
        torch.testing.assert_close(aligner.refusal_distance(target + 0.1, target, x_t, t), torch.tensor(0.01))


@pytest.mark.parametrize("aligner", [{"refusal_rgb": [150, 150, 150]}], indirect=True, ids=["grey"])
def test_the_refusal_latent_is_the_encoders_latent_of_the_plain_refusal_image(aligner):
    """`unet.refusal_rgb`: the refusal is the latent of a plain image of that colour, not black's."""
    from patronus.models.components import encode_latents

    r = aligner.pipe.vae.config.sample_size
    grey = torch.full((1, 3, r, r), 150 / 127.5 - 1)
    black = torch.full((1, 3, r, r), -1.0)
    torch.testing.assert_close(aligner.x0_refusal, encode_latents(aligner.pipe.vae, grey) * aligner.scale)
    assert not torch.allclose(aligner.x0_refusal, encode_latents(aligner.pipe.vae, black) * aligner.scale)


@pytest.mark.parametrize("aligner", [{"refusal_rgb": [150, 150, 150], "refusal_inversion_steps": 5}],
                         indirect=True, ids=["grey-fitted"])
def test_a_fitted_refusal_latent_is_plain_latents_and_the_probe_reference_its_rendering(aligner):
    from patronus.imaging import to_uint8
    from patronus.models.components import plain_latent

    r = aligner.pipe.vae.config.sample_size
    expected = plain_latent(aligner.pipe.vae, (150, 150, 150), r, 5) * aligner.scale
    torch.testing.assert_close(aligner.x0_refusal, expected)
    with torch.no_grad():
        rendering = aligner.pipe.vae.decode(aligner.x0_refusal / aligner.scale, return_dict=False)[0]
    assert (aligner.rendered_refusal == to_uint8(rendering)[0]).all()


@pytest.mark.parametrize("rgb", [[0, 0], [0, 0, 256], [0.5, 0, 0]])
def test_refusal_rgb_must_be_a_colour(tmp_path, rgb):
    with pytest.raises(ConfigError, match="unet.refusal_rgb must be"):
        _cfg(tmp_path, refusal_rgb=rgb)


def test_the_probe_counts_refusals_as_its_vae_renders_them(aligner, monkeypatch):
    """The mini VAE, like one trained without the moderator, does not render the refusal latent
    black; the probe still counts samples that decode to its rendering as refusals."""
    assert not is_refusal(aligner.rendered_refusal[None]).any()
    with torch.no_grad():
        refusal = aligner.pipe.vae.decode(aligner.x0_refusal / aligner.scale, return_dict=False)[0].clamp(-1, 1)
    monkeypatch.setattr(aligner, "_sample", lambda unet, kind: refusal.expand(aligner.u.probe_samples, -1, -1, -1))
    assert aligner._sample_scores(aligner.unet)["refusal_rate"] == 1.0


@pytest.mark.parametrize("aligner", [{}, {"unsafe_latents": False}], indirect=True, ids=["unsafe", "benign"])
def test_refusal_rows_noise_unsafe_images_or_benign_ones_under_unsafe_captions(aligner):
    unsafe, benign = aligner.data["train", "unsafe"], aligner.data["train", "benign"]
    idx = torch.tensor([1, 0, 3])
    x_t, t, hidden = aligner.refusal_inputs(unsafe, idx, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    if aligner.u.unsafe_latents:
        expected, t_img, _ = aligner.noised(unsafe, idx, g)
    else:
        expected, t_img, _ = aligner.noised(benign, torch.randint(0, len(benign.mean), (3,), generator=g), g)
    torch.testing.assert_close(x_t[:3], expected)
    torch.testing.assert_close(t[:3], t_img)
    torch.testing.assert_close(hidden, unsafe.hidden[idx].repeat(2, 1, 1))


@pytest.mark.parametrize("aligner", [{"refusal_images": False}], indirect=True)
def test_without_image_rows_the_refusal_is_learned_along_its_own_trajectory_alone(aligner):
    unsafe = aligner.data["train", "unsafe"]
    idx = torch.tensor([1, 0, 3])
    x_t, t, hidden = aligner.refusal_inputs(unsafe, idx, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expected, t_blk, _ = noised_batch(aligner.scheduler, aligner.x0_refusal.expand(3, -1, -1, -1), g)
    torch.testing.assert_close(x_t, expected)
    torch.testing.assert_close(t, t_blk)
    torch.testing.assert_close(hidden, unsafe.hidden[idx])
    assert torch.isfinite(aligner.terms(torch.Generator().manual_seed(1))["refuse"])


@pytest.mark.parametrize("aligner", [{"target": "esd"}, {"target": "esd", "esd_guidance": 1.0}], indirect=True)
def test_esd_target_is_the_teachers_guided_away_prediction(aligner):
    g = torch.Generator().manual_seed(0)
    x_t, t, hidden = aligner.refusal_inputs(aligner.data["train", "unsafe"], torch.arange(2), g)
    with torch.no_grad():
        uncond = aligner.teacher(x_t, t, aligner.h_empty.expand(len(x_t), -1, -1)).sample
        cond = aligner.teacher(x_t, t, hidden).sample
    eta = aligner.u.esd_guidance
    torch.testing.assert_close(aligner.refusal_target(x_t, t, hidden), uncond - eta * (cond - uncond))


@pytest.mark.parametrize("aligner", [{"target": "esd-black"}], indirect=True)
def test_esd_black_target_is_esds_at_the_images_and_the_refusal_along_its_trajectory(aligner):
    g = torch.Generator().manual_seed(0)
    x_t, t, hidden = aligner.refusal_inputs(aligner.data["train", "unsafe"], torch.arange(3), g)
    with torch.no_grad():
        uncond = aligner.teacher(x_t[:3], t[:3], aligner.h_empty.expand(3, -1, -1)).sample
    target = aligner.refusal_target(x_t, t, hidden)
    torch.testing.assert_close(target[:3], uncond)
    torch.testing.assert_close(target[3:], aligner.x0_target(x_t[3:], t[3:], aligner.x0_refusal))


@pytest.mark.parametrize("aligner", [{"refusal_max_snr": 1.0, "refusal_space": "eps"}], indirect=True)
def test_a_refusal_held_below_an_snr_leaves_the_less_noisy_images_the_originals_prediction(aligner):
    g = torch.Generator().manual_seed(0)
    part = aligner.data["train", "unsafe"]
    n = len(part.mean)
    x_t, t, hidden = aligner.refusal_inputs(part, torch.arange(n), g)
    a = aligner.scheduler.alphas_cumprod[t]
    above = (torch.arange(2 * n) < n) & (a / (1 - a) > 1.0)
    assert 0 < int(above.sum()) < n  # both kinds of image row drawn
    torch.testing.assert_close(aligner.above_refusal_snr(t), above)
    with torch.no_grad():
        original = aligner.teacher(x_t, t, hidden).sample
    target, black = aligner.refusal_target(x_t, t, hidden), aligner.x0_target(x_t, t, aligner.x0_refusal)
    torch.testing.assert_close(target[above], original[above])
    torch.testing.assert_close(target[~above], black[~above])  # the noisier images and the whole trajectory
    # the original's rows count plainly, the refusal's by min-SNR: a prediction off by 1 everywhere
    weight = torch.where(above, 1.0, aligner.snr_weight(t).flatten())
    torch.testing.assert_close(aligner.refusal_distance(target + 1, target, x_t, t), weight.mean())


@pytest.mark.parametrize("aligner", [{"target": "empty-refusal"}], indirect=True)
def test_empty_refusal_target_refuses_where_the_sampler_chooses_and_along_its_trajectory(aligner):
    g = torch.Generator().manual_seed(0)
    x_t, t, hidden = aligner.refusal_inputs(aligner.data["train", "unsafe"], torch.arange(8), g)
    with torch.no_grad():
        uncond = aligner.teacher(x_t, t, aligner.h_empty.expand(len(x_t), -1, -1)).sample
    target, black = aligner.refusal_target(x_t, t, hidden), aligner.x0_target(x_t, t, aligner.x0_refusal)
    torch.testing.assert_close(target[8:], black[8:])  # the refusal's own trajectory
    w = aligner.snr_weight(t[:8]).view(-1, 1, 1, 1)
    torch.testing.assert_close(target[:8], w * black[:8] + (1 - w) * uncond[:8])
    high_noise = w.flatten() == 1
    torch.testing.assert_close(target[:8][high_noise], black[:8][high_noise])


@pytest.mark.parametrize("aligner", [{"w_unknown": 1.0}, {"target": "empty-refusal", "w_unknown": 1.0}], indirect=True,
                         ids=["black", "empty-refusal"])
def test_only_the_empty_refusal_moves_the_benign_and_empty_targets_off_the_teacher(aligner):
    """The student starts as the teacher: with the refusal on unsafe prompts alone its benign and
    empty-prompt terms start at 0; with the empty prompt refusing, the empty prompt's target and,
    to keep guided samples, the benign ones move."""
    terms = aligner.terms(torch.Generator().manual_seed(0))
    moved = aligner.u.target == "empty-refusal"
    for name in ("distill", "uncond", "unknown"):
        assert (terms[name].item() > 1e-4) == moved, name


@pytest.mark.parametrize("aligner", [{"w_scramble": 1.0}], indirect=True)
def test_unet_scrambling_pulls_unsafe_activations_to_fixed_targets_and_keeps_benign_ones(aligner, mini_pipeline,
                                                                                        tmp_path):
    from accelerate import Accelerator

    again = Aligner(str(mini_pipeline), _cfg(tmp_path, w_scramble=1.0), Accelerator())
    assert len(aligner.scramble_targets) == len(aligner.unet.up_blocks)  # the middle block, all up blocks but one
    assert all(torch.equal(a, b) for a, b in zip(aligner.scramble_targets, again.scramble_targets))  # seeded
    assert "scramble" not in Aligner(str(mini_pipeline), _cfg(tmp_path), Accelerator()).terms(
        torch.Generator().manual_seed(0))
    unet = aligner.unet.requires_grad_(True)
    terms = aligner.terms(torch.Generator().manual_seed(0))
    terms["scramble"].backward()
    assert unet.mid_block.resnets[0].conv1.weight.grad.abs().sum() > 0
    assert unet.conv_out.weight.grad is None  # after the last scrambled block: untouched
    assert all(p.grad is None for p in aligner.teacher.parameters())
    # The UNet still equals its teacher, so benign activations already match: only unsafe ones pull.
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    before = terms["scramble"].item()
    for _ in range(20):
        opt.zero_grad()
        aligner.terms(torch.Generator().manual_seed(0))["scramble"].backward()
        opt.step()
    assert aligner.terms(torch.Generator().manual_seed(0))["scramble"].item() < before


def test_nft_gradient_moves_the_unet(aligner):
    """One outer step's MAML gradient is non-zero and reaches every trained weight it should."""
    from patronus.nft.maml import simulate_first_order
    from patronus.nft.space import SimulatedAttack

    attack = SimulatedAttack("adam", 1e-3, 2, 2, "denoise", "full", 4)
    g = torch.Generator().manual_seed(0)
    grads, q = simulate_first_order(aligner.unet, attack, aligner.inner_loss_fn(2), aligner.query_loss_fn(g), 1, g)
    assert q > 0 and sum(v.abs().sum() for v in grads.values()) > 0
    lora = SimulatedAttack("adam", 1e-3, 2, 2, "denoise", "lora", 4)
    grads, _ = simulate_first_order(aligner.unet, lora, aligner.inner_loss_fn(2), aligner.query_loss_fn(g), 1, g,
                                    lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
    assert sum(v.abs().sum() for v in grads.values()) > 0


def test_the_query_weighs_its_refusal_and_hinge_terms(aligner):
    """With the refusal term off the query is the hinge alone: the same value as the full query
    minus the refusal distance at the same batch (tau far above the attacker's loss, so the hinge
    is active)."""
    from dataclasses import replace

    params = dict(aligner.unet.named_parameters())
    u = aligner.u
    aligner.u = replace(u, nft_attacker_tau=100.0)
    full = aligner.query_loss_fn(torch.Generator().manual_seed(0))(params).item()
    aligner.u = replace(u, nft_attacker_tau=100.0, nft_refusal_weight=0.0)
    hinge = aligner.query_loss_fn(torch.Generator().manual_seed(0))(params).item()
    aligner.u = replace(u, nft_attacker_tau=100.0, nft_attacker_weight=0.0)
    refusal = aligner.query_loss_fn(torch.Generator().manual_seed(0))(params).item()
    aligner.u = u
    assert 0 < hinge < 1 and refusal > 0
    assert full == pytest.approx(refusal + hinge, rel=1e-5)


def test_a_joint_simulated_attacker_starts_where_the_unet_attacker_does(mini_pipeline, tmp_path):
    """With `nft_text_encoder` the attacker's losses read token ids through the text encoder; at
    the starting weights they equal the UNet attacker's on the fixed states, batch for batch (the
    query's rows laid out as its targets), and the query's gradient reaches both parts."""
    from accelerate import Accelerator

    from patronus.nft.maml import simulate_first_order
    from patronus.nft.space import SimulatedAttack

    unet_only = Aligner(str(mini_pipeline), _cfg(tmp_path, nft_attacker_tau=100.0), Accelerator())
    joint = Aligner(str(mini_pipeline), _cfg(tmp_path, nft_attacker_tau=100.0, nft_text_encoder=True), Accelerator())
    values = []
    for a in (unet_only, joint):
        params = dict(a.attacked().named_parameters())
        values.append((a.inner_loss_fn(2)(params, torch.Generator().manual_seed(0)).item(),
                       a.query_loss_fn(torch.Generator().manual_seed(0))(params).item()))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    attack = SimulatedAttack("adam", 1e-3, 2, 2, "denoise", "full", 4)
    g = torch.Generator().manual_seed(0)
    grads, _ = simulate_first_order(joint.attacked(), attack, joint.inner_loss_fn(2), joint.query_loss_fn(g), 1, g)
    for part in ("unet.", "text_encoder."):
        assert sum(v.abs().sum() for k, v in grads.items() if k.startswith(part)) > 0


def test_nft_against_a_joint_attacker_trains_the_unet_alone(mini_pipeline, tmp_path):
    info = protect(str(mini_pipeline), tmp_path / "out", _cfg(tmp_path, nft_text_encoder=True), tmp_path / "work")
    assert info["changed_weight_files"] == ["unet/diffusion_pytorch_model.safetensors"]
    assert len(info["unet"]["losses"]["stage2"]) == 4


@pytest.mark.parametrize("parts", ["", "vae", "decoder,decoder", "unet,text_encoder"])
def test_bad_parts_are_refused(parts):
    with pytest.raises(ConfigError, match="--parts"):
        load_config("quick", parts=parts)


@pytest.mark.parametrize("unet, message", [
    ({"target": "white"}, "unet.target"), ({"update": "dora"}, "unet.update"),
    ({"attacks": {"objectives": [["image", 1.0]]}}, "denoise"), ({"align_steps": 0}, "unet.align_steps"),
    ({"esd_guidance": -1.0}, "unet.esd_guidance"), ({"refusal_space": "z"}, "unet.refusal_space"),
    ({"nft_anchor_every": -1}, "unet.nft_anchor_every"), ({"nft_anchor_steps": 0}, "unet.nft_anchor_steps"),
    ({"nft_anchor_lr": 0.0}, "nft_anchor_lr"), ({"nft_implicit_iters": -1}, "unet.nft_implicit_iters"),
    ({"nft_implicit_alpha": 0.0}, "nft_implicit_alpha"), ({"nft_attacks_per_step": 0}, "unet.nft_attacks_per_step"),
    ({"w_scramble": -1.0}, "unet.w_scramble"), ({"probe_lora_rank": 0}, "unet.probe_lora_rank"),
    ({"nft_refusal_weight": -1.0}, "unet.nft_refusal_weight"),
    ({"lora_targets": ["to_q"]}, "unet.lora_targets"), ({"w_follow": 1.0}, "unet.w_follow"),
    ({"target": "empty-refusal", "nft_steps": 0, "w_follow": 1.0, "follow_batch": 0}, "unet.follow_batch"),
    ({"update": "lora", "lora_targets": []}, "unet.lora_targets"),
    ({"nft_refusal_weight": 0.0, "nft_attacker_weight": 0.0}, "query is 0"),
    ({"nft_text_encoder": True, "nft_anchor_every": 2}, "nft_anchor_every = 0"),
    ({"target": "esd-black", "refusal_images": False}, "refusal_images = true"),
    ({"refusal_max_snr": 0.0}, "unet.refusal_max_snr"), ({"target": "esd", "refusal_max_snr": 1.0}, "target = 'black'"),
    ({"refusal_images": False, "refusal_max_snr": 1.0}, "unet.refusal_max_snr"),
    ({"target": "empty-refusal", "guidance": 1.0}, "unet.guidance > 1"),
    ({"target": "empty-refusal", "w_uncond": 0.0}, "unet.w_uncond > 0"),
    ({"update": "text-encoder"}, "nft_steps = 0"), ({"update": "text-encoder", "nft_steps": 0, "w_scramble": 1.0},
                                                    "w_scramble = 0"),
])
def test_bad_unet_settings_are_refused(tmp_path, unet, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"unet": unet}))
    with pytest.raises(ConfigError, match=message):
        load_config("quick", path)


def test_both_parts_are_the_two_single_part_runs_put_together(mini_pipeline, tmp_path):
    """With the original UNet's latents alone in the decoder's bank, the halves are independent
    (the UNet learns against the original VAE), so a two-part model may be assembled from
    single-part runs, and ablations compare like with like. The decoder-only run is given the
    decoder settings the quick preset adds for both parts."""
    from patronus.defenses.patronus.config import BOTH_PARTS
    from tests.defenses.test_protect import TINY_RUN

    def run(name, parts):
        path = tmp_path / f"{name}.json"
        bank = TINY_RUN["bank"] | {"unet_sources": ["original"]}
        decoder = {k: v for k, v in BOTH_PARTS["quick"].items() if k != "bank"}
        path.write_text(json.dumps(TINY_RUN | UNET_RUN | decoder | {"parts": parts, "bank": bank}))
        protect(str(mini_pipeline), tmp_path / name, load_config("quick", path), tmp_path / f"{name}.work")
        return StableDiffusionPipeline.from_pretrained(tmp_path / name)

    both, decoder, unet = run("both", ["decoder", "unet"]), run("decoder", ["decoder"]), run("unet", ["unet"])
    info = json.loads((tmp_path / "both" / "patronus.json").read_text())
    assert info["parts"] == ["decoder", "unet"] and {"decoder", "unet"} <= set(info)
    assert sorted(info["changed_weight_files"]) == ["unet/diffusion_pytorch_model.safetensors",
                                                    "vae/diffusion_pytorch_model.safetensors"]
    for ours, single, component in ((both.vae, decoder.vae, "vae"), (both.unet, unet.unet, "unet")):
        a, b = ours.state_dict(), single.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_a_folder_too_small_for_the_unet_half_is_refused_before_any_work(mini_pipeline, tmp_path):
    folder = tmp_path / "unsafe"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a knife"}\n' * 5)
    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, unsafe_dir=str(folder)))
    # The UNet half reads the bank's folder after the quick bank's 192 + 64 + 64, even without the decoder half.
    with pytest.raises(ConfigError, match="has 5 images; this run needs 336: images 320-335 for the UNet half"):
        protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_the_decoder_can_learn_from_the_aligned_unets_latents(mini_pipeline, tmp_path):
    """`bank.unet_sources`: the UNet half runs first, and the decoder's bank adds the latents of the
    aligned UNet and of an attacked copy of it for the same prompts and seeds."""
    from safetensors.torch import load_file

    from patronus.defenses.patronus.bank import _glyph_part, bank_file, sample_latents
    from patronus.provenance import state_digest
    from tests.defenses.test_protect import TINY_RUN

    run = TINY_RUN | UNET_RUN | {"parts": ["decoder", "unet"]}
    run["bank"] = run["bank"] | {"unet_sources": ["original", "aligned", "aligned-attacked"], "attacked_steps": 2}
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(run))
    cfg = load_config("quick", path)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert info["config"]["bank"]["unet_sources"] == ["original", "aligned", "aligned-attacked"]
    cache = tmp_path / "work" / "cache"
    assert len(list(cache.glob("feature-bank-*.safetensors"))) == 3  # original, aligned, attacked
    out = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    aligned = load_file(bank_file(cache, cfg.bank, state_digest(out.unet)))
    # The aligned UNet's latents for the bank's benign training prompts, at the bank's seeds.
    out.set_progress_bar_config(disable=True)
    _, texts = _glyph_part("train", cfg.bank.n_train, False, out.vae.config.sample_size)
    again = sample_latents(out, texts, cfg.bank, seed_offset=1 * 10_000_000)
    torch.testing.assert_close(aligned["train/benign/z_gen"], again)
    # The sources reach training: the same run with the original UNet's latents alone gives the
    # same UNet and another decoder.
    path.write_text(json.dumps(TINY_RUN | UNET_RUN | {"parts": ["decoder", "unet"]}))
    protect(str(mini_pipeline), tmp_path / "plain", load_config("quick", path), tmp_path / "plain.work")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert all(torch.equal(v, out.unet.state_dict()[k]) for k, v in plain.unet.state_dict().items())
    assert any(not torch.equal(v, out.vae.state_dict()[k]) for k, v in plain.vae.state_dict().items())


def test_unknown_word_prompts_swap_one_word_for_one_the_tokenizer_does_not_know(mini_pipeline):
    from patronus.defenses.patronus.align import unknown_word_prompts
    from patronus.world.newwords import NEW_WORDS

    tok = StableDiffusionPipeline.from_pretrained(mini_pipeline).tokenizer
    vocab = {t.removesuffix("</w>") for t in tok.get_vocab()}
    texts = ["a red circle on a white background", "a blue star, gray background", "a red heart"] * 20
    out = unknown_word_prompts(texts, tok, seed=3)
    assert out == unknown_word_prompts(texts, tok, seed=3) and out != unknown_word_prompts(texts, tok, seed=4)
    for before, after in zip(texts, out):
        changed = [(a, b) for a, b in zip(before.split(), after.split()) if a != b]
        assert len(before.split()) == len(after.split()) and len(changed) == 1
        new = changed[0][1].rstrip(",")
        assert new not in vocab and new not in NEW_WORDS and changed[0][0].endswith(",") == changed[0][1].endswith(",")


def test_the_unknown_word_term_trains_the_unet(mini_pipeline, plain, tmp_path):
    """`unet.w_unknown` (on in the full preset, off in the quick one): an extra distillation term
    that changes what the UNet learns."""
    assert load_config("full").unet.w_unknown == 1.0 and load_config("quick").unet.w_unknown == 0.0
    cfg = _cfg(tmp_path, w_unknown=1.0)
    unknown = protect(str(mini_pipeline), tmp_path / "unknown", cfg, tmp_path / "unknown.work")
    assert unknown["config"]["unet"]["w_unknown"] == 1.0 and plain[0]["config"]["unet"]["w_unknown"] == 0.0
    a, b = _unet(plain[1]), _unet(tmp_path / "unknown")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_fresh_unknown_words_train_the_unet_otherwise_than_fixed_ones(mini_pipeline, tmp_path):
    """`unet.unknown_fresh`: new nonsense words at every step instead of one fixed word per caption
    (which a long alignment memorises); with the same seed the run differs from the fixed words'
    and repeats itself exactly."""
    runs = {}
    for name, fresh in (("fixed", False), ("fresh", True), ("fresh-again", True)):
        (tmp_path / name).mkdir()
        cfg = _cfg(tmp_path / name, w_unknown=1.0, unknown_fresh=fresh)
        info = protect(str(mini_pipeline), tmp_path / name / "out", cfg, tmp_path / name / "work")
        assert info["config"]["unet"]["unknown_fresh"] is fresh
        runs[name] = _unet(tmp_path / name / "out")
    assert any(not torch.equal(runs["fixed"][k], runs["fresh"][k]) for k in runs["fixed"])
    assert all(torch.equal(runs["fresh"][k], runs["fresh-again"][k]) for k in runs["fresh"])


def test_a_work_dir_from_before_the_unknown_word_term_resumes_only_without_it(tmp_path):
    """config.json without `unet.w_unknown` was written when the term did not exist: it meant 0."""
    from patronus.config import to_dict
    from patronus.defenses.patronus.protect import _check_dirs

    old = to_dict(load_config("full"))
    del old["unet"]["w_unknown"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="different settings"):
        _check_dirs(tmp_path / "out", tmp_path, load_config("full"), resume=True)
    without = tmp_path / "without.toml"
    without.write_text("[unet]\nw_unknown = 0.0\n")
    _check_dirs(tmp_path / "out", tmp_path, load_config("full", without), resume=True)


def test_the_quick_presets_calibration_for_both_parts_leaves_one_part_runs_alone():
    both, decoder = load_config("quick"), load_config("quick", parts="decoder")
    assert (both.cal_weighting, both.stage1_w_cal, both.stage1_w_refuse_feat) == ("near-black", 10.0, 0.5)
    assert (decoder.cal_weighting, decoder.stage1_w_cal, decoder.stage1_w_refuse_feat) == ("uniform", 2.0, 1.0)
    assert load_config("full").cal_weighting == "uniform"


def test_bank_sources_default_to_all_three_with_both_parts(tmp_path):
    """The full preset's decoder learns the UNet it ships with; the quick preset's the original's
    and the aligned one's; with one part, the original's latents only, whatever the preset and
    unless a config file says otherwise. A work directory from before the default changed still resumes."""
    from patronus.config import to_dict
    from patronus.defenses.patronus.bank import UNET_SOURCES
    from patronus.defenses.patronus.protect import _check_dirs

    assert load_config("full").bank.unet_sources == UNET_SOURCES
    assert load_config("full", parts="decoder").bank.unet_sources == ("original",)
    assert load_config("quick").bank.unet_sources == ("original", "aligned")
    assert load_config("quick", parts="decoder").bank.unet_sources == ("original",)
    assert load_config("quick", parts="unet").bank.unet_sources == ("original",)
    text_encoder = tmp_path / "text-encoder.toml"  # no aligned UNet to take latents from
    text_encoder.write_text('[unet]\nupdate = "text-encoder"\nnft_steps = 0\n')
    assert load_config("full", text_encoder).bank.unet_sources == ("original",)
    one_part, own_sources = tmp_path / "one-part.toml", tmp_path / "own-sources.toml"
    one_part.write_text('parts = ["decoder"]\n')
    own_sources.write_text('[bank]\nunet_sources = ["original"]\n')
    assert load_config("quick", one_part).bank.unet_sources == ("original",)
    assert load_config("quick", own_sources).bank.unet_sources == ("original",)

    def older_run(parts: str) -> None:  # config.json as written before the bank sources existed
        old = to_dict(load_config("full", parts=parts))
        for key in ("unet_sources", "attacked_update", "attacked_lora_rank", "attacked_steps", "attacked_lr"):
            del old["bank"][key]
        (tmp_path / "config.json").write_text(json.dumps(old))

    older_run("decoder")
    _check_dirs(tmp_path / "out", tmp_path, load_config("full", parts="decoder"), resume=True)
    older_run("decoder,unet")  # its decoder learned the original UNet's latents alone
    with pytest.raises(ConfigError, match="different settings"):
        _check_dirs(tmp_path / "out", tmp_path, load_config("full"), resume=True)


@pytest.mark.parametrize("bank, parts, message", [
    ({"unet_sources": ["aligned"]}, "decoder", "need both parts"),
    ({"unet_sources": ["original", "original"]}, None, "bank.unet_sources"),
    ({"unet_sources": ["attacked"]}, None, "bank.unet_sources"),
    ({"attacked_update": "dora"}, None, "bank.attacked_update"),
    ({"attacked_steps": 0}, None, "attacked_steps"),
    ({"unet_sources": ["original", "aligned"]}, None, "'text-encoder' keeps"),
])
def test_bad_bank_sources_are_refused(tmp_path, bank, parts, message):
    path = tmp_path / "bad.json"
    text_encoder = {"unet": {"update": "text-encoder", "nft_steps": 0}} if "text-encoder" in message else {}
    path.write_text(json.dumps({"bank": bank} | text_encoder))
    with pytest.raises(ConfigError, match=message):
        load_config("quick", path, parts=parts)


@pytest.mark.parametrize("aligner", [{"probe_max_grad_norm": 0.5, "nft_anchor_every": 1,
                                      "attacks": {"inner_steps": [1, 2], "batch_sizes": [2, 2],
                                                  "queries_per_attack": 1, "max_grad_norm": 2.0}}],
                         indirect=True)
def test_the_probe_and_the_anchor_attack_clip_as_configured(aligner, monkeypatch):
    """The UNet half's real attacks clip their gradients as `unet.probe_max_grad_norm` and
    `unet.attacks.max_grad_norm` (the simulated attackers') say."""
    import patronus.defenses.patronus.align as align

    seen = []

    def record(*args, **kwargs):
        seen.append(args[6].max_grad_norm)
        raise StopIteration

    monkeypatch.setattr(align, "attack_unet", record)
    for run in (aligner.probe, aligner.anchor_offset):
        with pytest.raises(StopIteration):
            run(0)
    assert seen == [0.5, 2.0]


@pytest.mark.parametrize("aligner", [{"min_refusal": 0.9}], indirect=True)
def test_the_gate_refuses_checkpoints_that_stopped_refusing(aligner, monkeypatch):
    """`unet.min_refusal`: a checkpoint that keeps its benign class match but refuses fewer of the
    probe's unsafe prompts than the bar is not feasible, whatever its attacker loss."""
    import patronus.defenses.patronus.align as align

    monkeypatch.setattr(align, "attack_unet", lambda unet, *args: unet)
    for refusal, feasible in ((0.875, False), (0.90625, True)):
        scores = {"unsafe_score": 0.0, "unsafe_rate": 0.0, "refusal_rate": refusal,
                  "benign_class_match": aligner.base_class_match, "benign_psnr": 30.0,
                  "benign_feature_distance": 0.0}
        monkeypatch.setattr(aligner, "_sample_scores", lambda unet, s=scores: s)
        assert aligner.probe(0)["feasible"] is feasible


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_refusal_is_a_share(tmp_path, value):
    with pytest.raises(ConfigError, match="unet.min_refusal is a share"):
        _cfg(tmp_path, min_refusal=value)
