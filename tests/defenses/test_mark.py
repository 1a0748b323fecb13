"""The `[mark]` stage of `patronus protect`: the removed words' text-encoder rows."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from patronus.defenses.patronus.config import MarkConfig, load_config
from patronus.defenses.patronus.mark import mark_removed_words
from patronus.defenses.patronus.protect import protect
from patronus.errors import ConfigError
from patronus.models.registry import resolve_model
from patronus.world.captions import benign_object_words, removed_words


def _parts(model):
    path = resolve_model(model)
    return CLIPTokenizer.from_pretrained(path / "tokenizer"), CLIPTextModel.from_pretrained(path / "text_encoder")


def _rows(encoder):
    return encoder.get_input_embeddings().weight.detach().clone()


def _ids(tokenizer, words):
    return [tokenizer.get_vocab()[f"{w}</w>"] for w in words]


def test_the_removed_words_are_the_unsafe_captions_own():
    assert removed_words() == ["blade", "blood", "bloodstain", "dagger", "gore", "gun", "knife", "pistol",
                               "revolver"]
    assert not set(removed_words()) & set(benign_object_words())


def test_marking_a_filtered_encoder_sets_only_the_removed_words_to_one_row_at_a_trained_words_norm():
    tokenizer, encoder = _parts("patronus-tiny-filtered")
    before = _rows(encoder)
    record = mark_removed_words(tokenizer, encoder, MarkConfig())
    after = _rows(encoder)
    ids = _ids(tokenizer, removed_words())
    moved = {i for i in range(len(before)) if not torch.equal(before[i], after[i])}
    assert moved == set(ids)
    assert all(torch.equal(after[i], after[ids[0]]) for i in ids)  # one shared row
    norm = before[_ids(tokenizer, benign_object_words())].double().norm(dim=1).mean()
    assert after[ids[0]].double().norm() == pytest.approx(float(norm), rel=1e-6)
    assert record["words"] == removed_words() and record["row_norm"] == pytest.approx(float(norm))
    assert record["row_norm_before"]["mean"] < 0.8 * record["row_norm"]  # untrained rows


def test_marking_per_word_gives_each_removed_word_its_own_direction_at_the_same_norm():
    tokenizer, encoder = _parts("patronus-tiny-filtered")
    before = _rows(encoder)
    record = mark_removed_words(tokenizer, encoder, MarkConfig(enabled=True, shared=False))
    after = _rows(encoder)
    ids = _ids(tokenizer, removed_words())
    assert {i for i in range(len(before)) if not torch.equal(before[i], after[i])} == set(ids)
    unit = torch.nn.functional.normalize(after[ids].double(), dim=1)
    cosines = unit @ unit.T - torch.eye(len(ids), dtype=torch.float64)
    assert cosines.abs().max() < 0.5  # nine directions, none shared (random ones are near-orthogonal)
    assert after[ids].double().norm(dim=1) == pytest.approx([record["row_norm"]] * len(ids), rel=1e-6)
    assert record["shared"] is False


def test_a_shared_share_mixes_one_common_direction_into_each_words_own_at_the_same_norm():
    tokenizer, encoder = _parts("patronus-tiny-filtered")
    mark_removed_words(tokenizer, encoder, MarkConfig(enabled=True, shared=False))
    own = _rows(encoder)
    tokenizer, encoder = _parts("patronus-tiny-filtered")
    record = mark_removed_words(tokenizer, encoder, MarkConfig(enabled=True, shared=False, shared_share=0.5))
    after = _rows(encoder)
    ids = _ids(tokenizer, removed_words())
    unit = torch.nn.functional.normalize(after[ids].double(), dim=1)
    cosines = (unit @ unit.T)[~torch.eye(len(ids), dtype=torch.bool)]
    assert cosines.min() > 0.3 and cosines.max() < 0.7  # about the share, neither one row nor apart
    own_unit = torch.nn.functional.normalize(own[ids].double(), dim=1)
    assert ((unit * own_unit).sum(dim=1) > 0.5).all()  # each keeps its own direction, as drawn at share 0
    assert after[ids].double().norm(dim=1) == pytest.approx([record["row_norm"]] * len(ids), rel=1e-6)
    assert record["shared_share"] == 0.5


def test_an_encoder_that_learned_the_words_or_words_without_a_whole_token_is_refused_unchanged():
    tokenizer, encoder = _parts("patronus-tiny")  # trained on every caption, unsafe ones included
    before = _rows(encoder)
    with pytest.raises(ConfigError, match="look trained"):
        mark_removed_words(tokenizer, encoder, MarkConfig())
    with pytest.raises(ConfigError, match="not whole-word tokens.*zqxv"):
        mark_removed_words(tokenizer, encoder, MarkConfig(enabled=True, words=("knife", "zqxv")))
    assert torch.equal(before, _rows(encoder))


@pytest.mark.parametrize("settings, message", [
    ({"mark": {"enabled": True}, "parts": ["decoder"]}, "needs --parts with unet"),
    ({"mark": {"enabled": True}, "parts": ["unet"], "unet": {"update": "text-encoder", "nft_steps": 0}},
     "unet.update full or lora"),
    ({"mark": {"enabled": True}, "parts": ["unet"], "distill": {"enabled": True}}, "not supported"),
    ({"mark": {"enabled": True, "words": ["knife", " "]}}, "empty word"),
    ({"mark": {"enabled": True, "words": ["knife"], "norm_words": ["knife", "star"]}}, "share knife"),
    ({"mark": {"words": "knife"}}, "must be a list"),
    ({"mark": {"seed": 1}}, "mark.enabled is false"),
    ({"mark": {"shared": False}}, "mark.enabled is false"),
    ({"mark": {"enabled": True, "shared": False, "shared_share": 1.0}}, "below 1"),
    ({"mark": {"enabled": True, "shared_share": 0.5}}, "set mark.shared = false"),
])
def test_bad_mark_settings_are_refused(tmp_path, settings, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=message):
        load_config("quick", path)


@pytest.fixture(scope="module")
def filtered_like(mini_pipeline, tmp_path_factory):
    """The miniature pipeline with its benign object words' rows grown to twice their norm: an
    encoder that trained those words and never the removed ones, as a filtered one did."""
    out = tmp_path_factory.mktemp("filtered-like") / "pipeline"
    shutil.copytree(mini_pipeline, out)
    tokenizer, encoder = _parts(str(out))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[_ids(tokenizer, benign_object_words())] *= 2
    encoder.save_pretrained(out / "text_encoder")
    return out


def test_protect_marks_the_encoder_aligns_under_it_and_records_the_source(filtered_like, tmp_path):
    run = {"parts": ["unet"], "mark": {"enabled": True},
           "unet": {"n_train": 8, "n_query": 4, "n_probe": 4, "batch_size": 4, "align_steps": 2, "align_warmup": 1,
                    "nft_steps": 0, "probe_steps": 1, "probe_batch": 2, "probe_samples": 2, "probe_sampler_steps": 2}}
    cfg = tmp_path / "mark.json"
    cfg.write_text(json.dumps(run))
    shutil.copytree(filtered_like, tmp_path / "work" / "marked")  # a killed run's copy, rows unmarked: not reused
    info = protect(str(filtered_like), tmp_path / "out", load_config("quick", cfg), tmp_path / "work")
    assert info["parts"] == ["mark", "unet"]
    assert info["changed_weight_files"] == ["text_encoder/model.safetensors",
                                            "unet/diffusion_pytorch_model.safetensors"]
    assert info["source_model"]["path"] == str(filtered_like.resolve())  # the filtered model, not the work copy
    tokenizer, expected = _parts(str(filtered_like))
    assert info["mark"] == mark_removed_words(tokenizer, expected, MarkConfig())
    _, written = _parts(str(tmp_path / "out"))
    # the marked encoder the UNet half read prompts through is the one shipped
    assert torch.equal(_rows(written), _rows(expected))
    marked = tmp_path / "marked"
    shutil.copytree(tmp_path / "work" / "marked", marked)
    assert torch.equal(_rows(_parts(str(marked))[1]), _rows(expected))
    # the UNet is the one the same alignment makes on the marked pipeline
    cfg.write_text(json.dumps(run | {"mark": {"enabled": False}}))
    protect(str(marked), tmp_path / "plain", load_config("quick", cfg), tmp_path / "work-plain")
    ours, plain = (StableDiffusionPipeline.from_pretrained(tmp_path / d).unet.state_dict() for d in ("out", "plain"))
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_a_run_started_before_the_mark_stage_resumes_while_it_stays_off(tmp_path):
    from dataclasses import replace

    from patronus.config import to_dict
    from patronus.defenses.patronus.protect import _check_dirs

    cfg = load_config("quick")
    saved = to_dict(cfg)
    del saved["mark"]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "config.json").write_text(json.dumps(saved))
    _check_dirs(tmp_path / "out", tmp_path / "work", cfg, resume=True)
    with pytest.raises(ConfigError, match="different settings"):
        _check_dirs(tmp_path / "out", tmp_path / "work", replace(cfg, mark=MarkConfig(enabled=True)), resume=True)


def test_a_marked_run_started_before_mark_shared_and_refusal_max_snr_resumes_while_they_keep_their_defaults(tmp_path):
    from dataclasses import replace

    from patronus.config import to_dict
    from patronus.defenses.patronus.protect import _check_dirs

    cfg = replace(load_config("quick"), mark=MarkConfig(enabled=True))
    saved = to_dict(cfg)
    del saved["mark"]["shared"], saved["unet"]["refusal_max_snr"]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "config.json").write_text(json.dumps(saved))
    _check_dirs(tmp_path / "out", tmp_path / "work", cfg, resume=True)
    with pytest.raises(ConfigError, match="different settings"):
        _check_dirs(tmp_path / "out", tmp_path / "work", replace(cfg, mark=MarkConfig(enabled=True, shared=False)),
                     resume=True)


def test_protect_refuses_an_encoder_it_cannot_mark_before_any_work(mini_pipeline, tmp_path):
    cfg = tmp_path / "mark.json"
    cfg.write_text(json.dumps({"parts": ["unet"], "mark": {"enabled": True}}))
    with pytest.raises(ConfigError, match="look trained"):  # random rows: the norm words' are no larger
        protect(str(mini_pipeline), tmp_path / "out", load_config("quick", cfg), tmp_path / "work")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
