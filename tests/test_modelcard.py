"""The model card (README.md) that protect and ship write into a protected pipeline."""

import json
import shutil

import pytest
import yaml

from patronus.defenses import matching_preset
from patronus.defenses.patronus.config import load_config
from patronus.modelcard import (
    CARD_FILE,
    EVALUATION_FILE,
    base_model_name,
    evaluation_from_run,
    model_card,
    read_evaluation,
    shipped_evaluation,
)
from patronus.models.registry import PROTECTED_DIR
from patronus.models.ship import main as ship_main
from patronus.models.ship import ship, write_card
from patronus.provenance import generation_digest, weight_hashes
from patronus.verify import verify
from tests.models.test_ship import _fake_run

SHIPPED_MANIFEST = json.loads((PROTECTED_DIR / "patronus.json").read_text())


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_shipped_card_is_what_ship_writes_and_holds_the_measured_numbers():
    card = (PROTECTED_DIR / CARD_FILE).read_text()
    assert card == model_card(SHIPPED_MANIFEST, shipped_evaluation(PROTECTED_DIR), "patronus-tiny-protected")
    meta = _front_matter(card)
    assert meta["base_model"] == "patronus-tiny" and "license" not in meta  # the licence is the user's choice
    assert {"text-to-image", "diffusers", "safety", "patronus"} <= set(meta["tags"])
    assert "# license:" in card
    assert "preset: `full`" in card and "the VAE decoder (`vae/`), the UNet (`unet/`)" in card
    assert "| 98.6% | [96.8%, 100.0%] |" in card and "24.7 dB" in card and "measured 2026-11-29" in card
    assert "**Does not hold:**" in card and "joint" in card and "original VAE put back" in card
    assert "patronus verify patronus-tiny-protected" in card and "Not measured" not in card


def test_the_shipped_evaluation_names_the_commands_that_measured_it():
    evaluation = read_evaluation(PROTECTED_DIR / EVALUATION_FILE)
    assert evaluation["no_attack"]["command"].startswith("patronus evaluate patronus-tiny-protected --suite glyph")
    assert evaluation["attacks"]["command"].startswith("patronus sweep patronus-tiny-protected")
    assert evaluation["no_attack"]["metrics"]["unsafe_rate"]["value"] == 0.0
    assert evaluation["attacks"]["unsafe_rate"]["joint"]["value"] == 0.99


def test_a_card_without_an_evaluation_says_not_measured_and_fits_the_parts():
    manifest = SHIPPED_MANIFEST | {"parts": ["decoder"], "shipped_as": None, "preset": None}
    card = model_card(manifest)
    assert "Not measured" in card and "preset: not recorded" in card
    assert "swapping the original VAE or decoder back in (100% unsafe)" in card  # what a decoder-only one fails
    assert "patronus verify DIR" in card


def test_a_baseline_card_and_a_hub_base_model():
    manifest = {"defense": "checker", "preset": "default", "pipeline": "StableDiffusionPipeline",
                "source_model": {"path": "/c/hub/models--runwayml--stable-diffusion-v1-5/snapshots/39593d5"},
                "changed_weight_files": ["safety_checker/diffusion_pytorch_model.safetensors"]}
    card = model_card(manifest, name="sd15-checker")
    assert _front_matter(card)["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert "`remove-filter`: 100% unsafe" in card and "# sd15-checker" in card
    assert base_model_name("/x/patronus/assets/patronus-tiny") == "patronus-tiny"


def test_an_evaluate_run_goes_on_the_card(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    metrics = {"unsafe_rate": {"value": 0.125, "ci": [0.05, 0.2], "n": 24},
               "benign_class_match": {"value": 0.9, "ci": [0.8, 1.0], "n": 24}}
    (run / "metrics.json").write_text(json.dumps({"model": {"name": "runs/p"}, "settings": {"suite": "glyph-quick"},
                                                  "reference": {"name": "patronus-tiny"}, "metrics": metrics}))
    evaluation = evaluation_from_run(run)
    assert evaluation["no_attack"]["command"] == ("patronus evaluate runs/p --suite glyph-quick "
                                                  "--reference patronus-tiny --out eval")
    card = model_card(SHIPPED_MANIFEST, evaluation)
    assert "| unsafe rate (unsafe prompts, detector) | 12.5% | [5.0%, 20.0%] |" in card
    (run / "metrics.json").write_text("{")
    with pytest.raises(Exception, match="not the metrics.json"):
        read_evaluation(run)


def test_ship_writes_the_card_and_the_evaluation_without_touching_weights(tmp_path):
    run = _fake_run(tmp_path)
    out = ship(run, "tiny-variant", assets=tmp_path / "assets")
    assert "Not measured" in (out / CARD_FILE).read_text() and not (out / EVALUATION_FILE).exists()
    weights = weight_hashes(out)
    write_card("tiny-variant", PROTECTED_DIR / EVALUATION_FILE, assets=tmp_path / "assets")
    assert weight_hashes(out) == weights and (out / EVALUATION_FILE).exists()
    assert "98.6%" in (out / CARD_FILE).read_text()
    shutil.rmtree(tmp_path / "assets")
    out = ship(run, "tiny-variant", assets=tmp_path / "assets", evaluation=PROTECTED_DIR / EVALUATION_FILE)
    assert "98.6%" in (out / CARD_FILE).read_text()
    with pytest.raises(SystemExit) as e:
        ship_main(["--card", "tiny-variant", str(run)])
    assert e.value.code == 2


def test_the_card_is_no_weight_file_and_decides_nothing(tmp_path):
    copy = tmp_path / "protected"
    shutil.copytree(PROTECTED_DIR, copy, symlinks=False)
    digest = generation_digest(copy)
    (copy / CARD_FILE).write_text("edited by whoever publishes it\n")
    (copy / EVALUATION_FILE).unlink()
    result = verify(copy)
    assert result.intact, result.problems
    assert generation_digest(copy) == digest


def test_the_preset_is_recognised_at_any_parts():
    assert matching_preset("patronus", load_config("quick")) == "quick"
    assert matching_preset("patronus", load_config("full", parts="decoder")) == "full"
    from dataclasses import replace

    assert matching_preset("patronus", replace(load_config("quick"), stage1_steps=7)) is None
    from patronus.defenses import load_defense

    assert matching_preset("sld", load_defense("sld").load_config("strong")) == "strong"


def test_baselines_write_a_card(mini_pipeline, tmp_path):
    from patronus.defenses import load_defense

    defense = load_defense("negative-prompt")
    info = defense.protect(str(mini_pipeline), tmp_path / "d", defense.load_config("default"), tmp_path / "w")
    assert info["preset"] == "default"
    card = (tmp_path / "d" / CARD_FILE).read_text()
    assert "defence: `negative-prompt`" in card and "preset: `default`" in card and "# d\n" in card
    assert verify(tmp_path / "d").intact
