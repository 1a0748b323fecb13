"""The baseline defences on a miniature pipeline: what each writes and that sampling honours it."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import patronus.defenses.baselines.checker  # noqa: F401  (diffusers loads only imported component classes)
from patronus.config import build
from patronus.defenses import load_defense
from patronus.errors import ConfigError
from patronus.models.inference import read_inference
from patronus.models.registry import load_pipeline
from patronus.models.sampling import generate, generate_latents
from patronus.provenance import weight_hashes
from patronus.sweep.cell import same_unet_attack_inputs

PROMPTS, SEEDS = ["a red knife on a white background", "a blue circle"], [0, 1]


def _protect(name, model, out, preset=None, **values):
    defense = load_defense(name)
    cfg = defense.load_config(preset or defense.DEFAULT_PRESET)
    if values:
        cfg = build(type(cfg), values, name)
    return defense.protect(str(model), out, cfg, out.with_name("w"))


@pytest.mark.parametrize("name,new_files", [("negative-prompt", []), ("sld", []),
                                            ("checker", ["safety_checker/diffusion_pytorch_model.safetensors"])])
def test_baselines_copy_every_weight_and_record_themselves(mini_pipeline, tmp_path, name, new_files):
    info = _protect(name, mini_pipeline, tmp_path / "d")
    assert info["defense"] == name and info["changed_weight_files"] == new_files
    src, out = weight_hashes(mini_pipeline), weight_hashes(tmp_path / "d")
    assert all(out[k] == v for k, v in src.items())  # bitwise the source's
    assert json.loads((tmp_path / "d" / "patronus.json").read_text())["weight_files_sha256"] == out
    assert not same_unet_attack_inputs(str(tmp_path / "d"), str(mini_pipeline))  # filters change what is drawn


def test_negative_prompt_is_what_sampling_passes(mini_pipeline, tmp_path):
    _protect("negative-prompt", mini_pipeline, tmp_path / "d")
    inference = read_inference(tmp_path / "d")
    assert "knife" in inference.negative_prompt and "dagger" not in inference.negative_prompt  # held-out word
    pipe = load_pipeline(tmp_path / "d")
    plain = generate_latents(pipe, PROMPTS, SEEDS)
    negative = generate_latents(pipe, PROMPTS, SEEDS, inference=inference)
    direct = pipe(PROMPTS, negative_prompt=[inference.negative_prompt] * 2, output_type="latent",
                  generator=[torch.Generator().manual_seed(s) for s in SEEDS], num_inference_steps=25,
                  guidance_scale=4.0).images
    assert not torch.allclose(plain, negative)
    assert torch.allclose(negative, direct)


def test_sld_samples_with_its_preset(mini_pipeline, tmp_path):
    _protect("sld", mini_pipeline, tmp_path / "d", preset="max")
    pipe = load_pipeline(tmp_path / "d")
    assert type(pipe).__name__ == "StableDiffusionPipelineSafe"
    inference = read_inference(tmp_path / "d")
    assert inference.sld_preset == "max"
    safe = generate_latents(pipe, PROMPTS, SEEDS, steps=4, inference=inference)
    plain = generate_latents(load_pipeline(mini_pipeline), PROMPTS, SEEDS, steps=4)
    assert safe.shape == plain.shape and not torch.allclose(safe, plain)


@pytest.mark.parametrize("threshold,black", [(1e-6, True), (1 - 1e-6, False)])
def test_checker_runs_inside_diffusers_and_in_patronus_sampling(mini_pipeline, tmp_path, threshold, black):
    _protect("checker", mini_pipeline, tmp_path / "d", threshold=threshold)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "d")  # plain diffusers loads and runs it
    assert type(pipe.safety_checker).__name__ == "GlyphSafetyChecker"
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=4.0, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    assert out.nsfw_content_detected == [black, black]
    images = generate(load_pipeline(tmp_path / "d"), PROMPTS, SEEDS, steps=4)
    assert (images.max() == 0) == black
    # The same images as diffusers' own call, up to float rounding on the way to uint8.
    assert np.abs(images.astype(int) - (out.images * 255).round().astype(int)).max() <= 1


def test_bad_baseline_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--parts applies to the patronus defence only"):
        load_defense("checker").load_config("default", parts="unet")
    with pytest.raises(ConfigError, match="unknown preset 'huge' for sld"):
        load_defense("sld").load_config("huge")
    with pytest.raises(ConfigError, match="threshold must lie in"):
        build(load_defense("checker").CheckerConfig, {"threshold": 2.0}, "checker")


@pytest.mark.parametrize("variant", ["u", "x"])
def test_esd_trains_only_its_part_of_the_unet(mini_pipeline, tmp_path, variant):
    info = _protect("esd", mini_pipeline, tmp_path / "d", variant=variant, steps=2, batch_size=2, sampler_steps=2,
                    n_prompts=8, lr=1e-2)
    assert info["changed_weight_files"] == ["unet/diffusion_pytorch_model.safetensors"]
    before, after = (load_pipeline(p).unet.state_dict() for p in (mini_pipeline, tmp_path / "d"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    cross = {k for k in changed if ".attn2." in k}
    assert changed and (cross == changed if variant == "x" else not cross)
    assert len(info["esd"]["losses"]) == 2


def test_verify_names_removed_inference_settings(mini_pipeline, tmp_path):
    from patronus.models.inference import INFERENCE_FILE
    from patronus.verify import verify

    _protect("sld", mini_pipeline, tmp_path / "d")
    assert verify(tmp_path / "d").intact
    (tmp_path / "d" / INFERENCE_FILE).unlink()
    index = json.loads((tmp_path / "d" / "model_index.json").read_text())
    (tmp_path / "d" / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionPipeline"}))
    problems = verify(tmp_path / "d").problems
    assert any("inference-time settings removed" in p for p in problems)
    assert any("names StableDiffusionPipeline, the manifest records StableDiffusionPipelineSafe" in p for p in problems)


def test_uce_defaults_use_the_defenders_words_only():
    cfg = load_defense("uce").load_config()
    assert set(cfg.erase) == {"knife", "blade", "gun", "pistol", "blood", "bloodstain"}  # no dagger, revolver, gore
    assert {"spoon", "key", "flower", "circle", "red", "white"} <= set(cfg.preserve)
    assert not {"dagger", "revolver", "gore"} & set(cfg.erase + cfg.preserve) and cfg.guide == ""
    uce = load_defense("uce").UCEConfig
    for values, message in (({"erase": []}, "erase must be a non-empty list"),
                            ({"lam": 0.0}, "lam must be a positive number"),
                            ({"erase": ["knife"], "preserve": ["knife"]}, "both erase and preserve knife"),
                            ({"guide": "knife"}, "guide 'knife' is one of the erased")):
        with pytest.raises(ConfigError, match=message):
            build(uce, values, "uce")


def test_uce_closed_form_meets_its_constraints_and_stays_put_under_a_large_lambda():
    from patronus.defenses.baselines.uce import closed_form

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    erase, guide, preserve = (torch.randn(n, 16, generator=g) for n in (3, 3, 5))  # fewer keys than dimensions
    new = closed_form(w, erase, guide @ w.T, preserve, lam=1e-8)
    assert torch.allclose(erase @ new.T, guide @ w.T, atol=1e-4)  # erased keys give the guide's values
    assert torch.allclose(preserve @ new.T, preserve @ w.T, atol=1e-4)  # preserved keys keep theirs
    assert torch.allclose(closed_form(w, erase, guide @ w.T, preserve, lam=1e9), w, atol=1e-6)
    assert closed_form(w.half(), erase, guide @ w.T, preserve, lam=1.0).dtype == torch.float16


def test_uce_edits_only_the_cross_attention_keys_and_values(mini_pipeline, tmp_path):
    from patronus.defenses.baselines.uce import closed_form, concept_keys, cross_attention_projections

    info = _protect("uce", mini_pipeline, tmp_path / "d")
    assert info["changed_weight_files"] == ["unet/diffusion_pytorch_model.safetensors"]
    before, after = (load_pipeline(p).unet.state_dict() for p in (mini_pipeline, tmp_path / "d"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    edited = {k for k in before if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert edited and changed == edited and len(info["uce"]["edited"]) == len(edited)
    u = info["uce"]
    assert u["erase_error_after"] < u["erase_error_before"] and u["preserve_change"] < 0.15
    assert "uce: 14 cross-attention projections edited" in load_defense("uce").describe(info, tmp_path)[-1]
    # On the model's own states: one erased word's values move more than halfway to the empty prompt's
    # (its 15 states and the 32 preserved ones overdetermine the 32-dim keys), the preserved values barely move.
    pipe = load_pipeline(mini_pipeline)
    cfg = build(load_defense("uce").UCEConfig, {"erase": ["knife"], "preserve": ["spoon", "circle"], "lam": 0.01},
                "uce")
    erase, guide, preserve = concept_keys(pipe, cfg)
    assert erase.shape == guide.shape and len(preserve) == 2 * pipe.tokenizer.model_max_length
    for name, layer in cross_attention_projections(pipe.unet, erase.shape[1]).items():
        w = layer.weight.detach()
        new = closed_form(w, erase, guide @ w.T, preserve, cfg.lam)
        to_guide = (erase @ new.T - guide @ w.T).norm() / (erase @ w.T - guide @ w.T).norm()
        kept = (preserve @ new.T - preserve @ w.T).norm() / (preserve @ w.T).norm()
        assert to_guide < 0.5 and kept < 0.1, (name, float(to_guide), float(kept))
