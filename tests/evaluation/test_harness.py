import json
import subprocess
import sys

import pytest
import torch

from patronus.evaluation.harness import EvalConfig, evaluate

QUICK = EvalConfig(suite="glyph-quick", steps=2, batch_size=16)


@pytest.fixture(scope="module")
def run(mini_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    return out, evaluate(str(mini_pipeline), out, QUICK, reference=str(mini_pipeline))


def test_run_is_traceable(run):
    out, result = run
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == result["timing"]["images"] == 36
    for rec in records:
        assert (out / rec["image"]).exists()
        assert {"prompt", "group", "seed", "refused", "detector"} <= set(rec)
        assert {"unsafe", "unsafe_score", "class"} <= set(rec["detector"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema_version"] == 1 and len(saved["model"]["weights_sha256"]) == 64
    assert saved["settings"]["steps"] == 2 and saved["versions"]["torch"]
    assert saved["versions"]["torch_threads"] == torch.get_num_threads()  # CPU results depend on it
    m = saved["metrics"]
    for key in ("unsafe_rate", "refusal_rate", "unsafe_rate[group=held_out]", "unsafe_rate[class=knife]",
                "false_refusal_rate[hard_negative]", "benign_class_match", "frechet_glyphnet", "psnr_vs_reference"):
        assert key in m and m[key]["n"] > 0 and m[key]["ci"][0] <= m[key]["value"] <= m[key]["ci"][1]
    # a model compared with itself at the same seeds is pixel-identical
    assert m["psnr_vs_reference"]["value"] == 100.0 and m["ssim_vs_reference"]["value"] == pytest.approx(1.0)
    # a flag in metrics traces back to the records: recompute the unsafe rate from records.jsonl
    unsafe = [r["detector"]["unsafe"] for r in records if r["kind"] == "unsafe"]
    assert m["unsafe_rate"]["value"] == pytest.approx(sum(unsafe) / len(unsafe))


def test_same_settings_same_numbers(run, mini_pipeline, tmp_path):
    _, first = run
    again = evaluate(str(mini_pipeline), tmp_path / "again", QUICK, reference=str(mini_pipeline))
    assert again["metrics"] == first["metrics"]


def test_saved_latents_decode_to_the_same_run_with_another_decoder(run, mini_pipeline, shifted_decoder, tmp_path):
    import torch
    from PIL import Image

    out, _ = run
    other = shifted_decoder(mini_pipeline, tmp_path / "other-decoder", 0.3)
    sampled = evaluate(str(other), tmp_path / "sampled", QUICK)
    decoded = evaluate(str(other), tmp_path / "decoded", QUICK, latents_from=out)
    assert decoded["timing"]["latents_from"] == str(out.resolve())
    assert decoded["metrics"] == sampled["metrics"]
    for name in ("00000.png", "00035.png"):
        a, b = (Image.open(tmp_path / d / "images" / name) for d in ("sampled", "decoded"))
        assert list(a.getdata()) == list(b.getdata())
    # Latents from a pipeline with another UNet, or sampled with other settings, are refused.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(other / "unet")
    with torch.no_grad():
        next(unet.parameters()).add_(1e-3)
    unet.save_pretrained(other / "unet")
    with pytest.raises(ValueError, match="UNet, text encoder"):
        evaluate(str(other), tmp_path / "refused", QUICK, latents_from=out)
    with pytest.raises(ValueError, match="other evaluation settings"):
        evaluate(str(mini_pipeline), tmp_path / "refused", EvalConfig(suite="glyph-quick", steps=3, batch_size=16),
                 latents_from=out)
    assert not (tmp_path / "refused").exists()


def test_rendered_refusal_is_the_models_own_rendering_of_black(run, mini_pipeline, shifted_decoder, tmp_path):
    """A VAE that renders the black image's latent grey: `refusal="rendered"` counts the images near
    that grey as refusals, reusing the latents of a run that counted near-black ones."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from patronus.evaluation.harness import rendered_refusal
    from patronus.evaluation.metrics import REFUSAL_MEAN, is_refusal
    from patronus.models.registry import load_pipeline

    out, _ = run
    grey = shifted_decoder(mini_pipeline, tmp_path / "grey-vae", 0.3)
    resolution = Image.open(out / "images" / "00000.png").size[0]
    reference = rendered_refusal(load_pipeline(str(grey)), resolution)
    assert reference.shape == (resolution, resolution, 3) and reference.mean() / 255 > REFUSAL_MEAN
    assert not is_refusal(reference[None])[0] and is_refusal(reference[None], reference)[0]

    rendered = evaluate(str(grey), tmp_path / "rendered", dataclasses.replace(QUICK, refusal="rendered"),
                        latents_from=out)
    threshold = rendered["settings"]["refusal_threshold"]
    assert threshold["reference"] == "rendered"
    assert threshold["reference_mean"] == pytest.approx(reference.mean() / 255)
    records = [json.loads(line) for line in (tmp_path / "rendered" / "records.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(tmp_path / "rendered" / r["image"])) for r in records])
    assert [r["refused"] for r in records] == is_refusal(images, reference).tolist()
    with pytest.raises(ValueError, match="unknown --refusal 'grey'"):
        EvalConfig(refusal="grey")


def test_rendered_refusal_of_a_plain_colour(mini_pipeline):
    """`refusal_rgb`: the reference is the rendering of that colour's latent ("rendered") or the
    plain colour itself ("plain"), which a refusal drawn in black does not match; the colour needs
    one of those rules and must be a colour."""
    from patronus.evaluation.harness import refusal_reference, rendered_refusal
    from patronus.evaluation.metrics import is_refusal
    from patronus.models.registry import load_pipeline

    pipe = load_pipeline(str(mini_pipeline))
    grey, black = rendered_refusal(pipe, 32, (150, 150, 150)), rendered_refusal(pipe, 32)
    assert not is_refusal(black[None], grey)[0]
    plain = refusal_reference(pipe, 32, EvalConfig(refusal="plain", refusal_rgb=(150, 150, 150)))
    assert plain.shape == (32, 32, 3) and (plain == 150).all()
    assert not is_refusal(black[None], plain)[0] and refusal_reference(pipe, 32, EvalConfig()) is None
    with pytest.raises(ValueError, match="add --refusal rendered"):
        EvalConfig(refusal_rgb=(150, 150, 150))
    with pytest.raises(ValueError, match="three integers in 0-255"):
        EvalConfig(refusal="rendered", refusal_rgb=(150, 150))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "patronus", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("unsafe,content", [
    ("u.csv", b"text\nhello\n"),
    ("u.txt", b""),
    ("u.txt", "na\u00efve".encode("latin-1")),
])
def test_malformed_prompt_file_cli(mini_pipeline, tmp_path, unsafe, content):
    (tmp_path / unsafe).write_bytes(content)
    (tmp_path / "b.txt").write_text("a red circle\n")
    r = cli("evaluate", str(mini_pipeline), "--unsafe-prompts", str(tmp_path / unsafe),
            "--benign-prompts", str(tmp_path / "b.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_not_a_pipeline_cli(tmp_path):
    (tmp_path / "dir").mkdir()
    r = cli("evaluate", str(tmp_path / "dir"), "--suite", "glyph-quick", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a diffusers pipeline" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rgb,message", [("150,150", "three integers in 0-255"), ("grey", "not three integers"),
                                         ("150,150,150", "add --refusal rendered")])
def test_refusal_rgb_cli(mini_pipeline, tmp_path, rgb, message):
    r = cli("evaluate", str(mini_pipeline), "--suite", "glyph-quick", "--refusal-rgb", rgb,
            "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
