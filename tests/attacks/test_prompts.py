"""Prompt-space attacks and remove-filter on a miniature pipeline."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from patronus.attacks.config import AttackConfig
from patronus.attacks.registry import ATTACK_PROMPTS, run_attack
from patronus.defenses import load_defense
from patronus.evaluation.harness import EvalConfig, resolve_prompts
from patronus.evaluation.suites import PromptFileError
from patronus.models.inference import INFERENCE_FILE
from patronus.models.registry import load_pipeline
from patronus.world.captions import HELD_OUT_SYNONYMS, SYNONYMS, TEMPLATES
from patronus.world.glyphs import UNSAFE_CLASSES


def _defended(name, model, out):
    defense = load_defense(name)
    return defense.protect(str(model), out, defense.load_config(defense.DEFAULT_PRESET), out.with_name("w"))


@pytest.mark.parametrize("defense", ["checker", "sld", "negative-prompt"])
def test_remove_filter_gives_the_plain_pipeline_with_the_same_weights(mini_pipeline, tmp_path, defense):
    _defended(defense, mini_pipeline, tmp_path / "defended")
    [ckpt] = run_attack(str(tmp_path / "defended"), AttackConfig(kind="remove-filter"), tmp_path / "rf", progress=False)
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert not (ckpt / INFERENCE_FILE).exists()
    a, b = load_pipeline(ckpt), load_pipeline(mini_pipeline)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb), name


@pytest.mark.parametrize("defense,kept", [("checker", "safety_checker"), ("negative-prompt", INFERENCE_FILE)])
def test_weight_attacks_keep_the_filters(mini_pipeline, tmp_path, defense, kept):
    _defended(defense, mini_pipeline, tmp_path / "defended")
    [ckpt] = run_attack(str(tmp_path / "defended"), AttackConfig(kind="unet-full", steps=1, batch_size=2, save_at=(1,)),
                        tmp_path / "a", progress=False)
    assert (ckpt / kept).exists()


def test_paraphrase_asks_every_template_and_synonym(mini_pipeline, tmp_path):
    [ckpt] = run_attack(str(mini_pipeline), AttackConfig(kind="paraphrase"), tmp_path / "p", progress=False)
    spec = json.loads((ckpt / ATTACK_PROMPTS).read_text())
    prompts = resolve_prompts(EvalConfig(suite="glyph-quick", prompt_rewrite=spec))
    unsafe = [p.prompt for p in prompts if p.kind == "unsafe"]
    benign = [p for p in prompts if p.kind == "benign"]
    assert len(benign) == 18  # the suite's benign prompts stay
    for cls in UNSAFE_CLASSES:
        for word in SYNONYMS[cls]:
            for template in TEMPLATES:
                head = template.split("{color}")[0]
                assert any(p.startswith(head) and f" {word}" in p for p in unsafe), (cls, word, template)
    assert {p.group for p in prompts if p.kind == "unsafe"} == {"explicit", "synonym", "held_out"}
    assert any(word in p for words in HELD_OUT_SYNONYMS.values() for word in words for p in unsafe)


@pytest.mark.parametrize("kind", ["textual-inversion", "soft-prompt"])
def test_token_attacks_train_only_the_new_tokens(mini_pipeline, tmp_path, kind):
    cfg = AttackConfig(kind=kind, lr=1e-1, steps=2, batch_size=2, save_at=(2,), sampler_steps=2)
    [ckpt] = run_attack(str(mini_pipeline), cfg, tmp_path / "t", progress=False)
    spec = json.loads((ckpt / ATTACK_PROMPTS).read_text())
    assert spec["rewrite"] == "tokens" and set(spec["tokens"]) == set(UNSAFE_CLASSES)
    before, after = load_pipeline(mini_pipeline), load_pipeline(ckpt)
    old, new = (p.text_encoder.get_input_embeddings().weight for p in (before, after))
    assert new.shape[0] == old.shape[0] + len(UNSAFE_CLASSES)
    assert torch.equal(new[:len(old)], old)  # the vocabulary the model had is untouched
    learned = new[len(old):]
    assert not torch.allclose(learned, learned.mean(0).expand_as(learned))  # moved off the common init
    for name in ("unet", "vae"):
        sa, sb = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    te_a = {k: v for k, v in before.text_encoder.state_dict().items() if "token_embedding" not in k}
    te_b = after.text_encoder.state_dict()
    assert all(torch.equal(v, te_b[k]) for k, v in te_a.items())
    # The prompts name no unsafe word; each class is asked for by its token.
    prompts = resolve_prompts(EvalConfig(suite="glyph-quick", prompt_rewrite=spec))
    unsafe_words = {w for cls in UNSAFE_CLASSES for w in SYNONYMS[cls]}
    assert all(not (set(p.prompt.split()) & unsafe_words) for p in prompts if p.kind == "unsafe")
    # diffusers' own textual-inversion loader reads the saved embedding into the original pipeline.
    plain = StableDiffusionPipeline.from_pretrained(mini_pipeline)
    token = spec["tokens"]["knife"]
    plain.load_textual_inversion(str(ckpt / "learned_embeds" / f"{token.strip('<>')}.safetensors"), token=token)
    i = after.tokenizer.convert_tokens_to_ids(token)
    assert torch.equal(plain.text_encoder.get_input_embeddings().weight[-1], new[i])


def test_token_rewrite_needs_a_glyph_suite(tmp_path):
    (tmp_path / "u.txt").write_text("a prompt\n")
    spec = {"rewrite": "tokens", "tokens": {"knife": "<ti-1>"}}
    with pytest.raises(PromptFileError, match="needs a glyph suite"):
        resolve_prompts(EvalConfig(suite=None, unsafe_prompts=str(tmp_path / "u.txt"),
                                   benign_prompts=str(tmp_path / "u.txt"), prompt_rewrite=spec))
    with pytest.raises(PromptFileError, match="maps unsafe classes"):
        EvalConfig(prompt_rewrite={"rewrite": "tokens", "tokens": {"circle": "<x>"}})
