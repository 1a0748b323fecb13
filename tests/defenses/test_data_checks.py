"""What each half reads: the probes' detector and gate, and the defender's images, checked up front."""

import json

import pytest

from patronus.defenses.patronus.align import load_partitions
from patronus.defenses.patronus.config import load_config
from patronus.defenses.patronus.defender_data import blocks
from patronus.defenses.patronus.protect import protect
from patronus.errors import ConfigError
from patronus.models.registry import load_pipeline
from patronus.world import UNSAFE_CLASSES, export_imagefolder
from patronus.world.glyphs import CLASS_NAMES
from tests.defenses.test_align import UNET_RUN
from tests.defenses.test_protect import TINY_RUN
from tests.test_cli import assert_clean_error, run_cli

BENIGN = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)


def _config(tmp_path, run: dict, name: str = "run.json"):
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return load_config("quick", path)


def _folder(path, n: int, classes=UNSAFE_CLASSES):
    """An image folder whose captions name each image's position ("image 7"), to see who read which."""
    folder = export_imagefolder("defender", n, path, classes=classes)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r | {"text": f"image {i}"}) + "\n"
                                                   for i, r in enumerate(rows)))
    return folder


@pytest.mark.parametrize("run, message", [
    ({"probe_detector": "clip"}, "unknown probe_detector 'clip'; choose one of glyphnet, nudenet"),
    ({"probe_detector": "nudenet"}, "with probe_detector = 'nudenet' set unet.gate = 'fidelity'"),
    ({"unet": {"gate": "labels"}}, "unet.gate must be one of class, fidelity"),
    ({"unet": {"max_feature_distance": -1.0}}, "unet.max_feature_distance must not be negative"),
])
def test_bad_probe_settings_are_refused(tmp_path, run, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, run)


def test_a_label_free_detector_needs_the_fidelity_gate_only_where_the_unet_is_probed(tmp_path):
    assert _config(tmp_path, {"probe_detector": "nudenet", "parts": ["decoder"]}).unet.gate == "class"
    cfg = _config(tmp_path, {"probe_detector": "nudenet", "unet": {"gate": "fidelity"}})
    assert (cfg.probe_detector, cfg.unet.gate) == ("nudenet", "fidelity")


def test_one_folder_is_split_between_the_halves_without_overlap(mini_pipeline, tmp_path):
    """The decoder half reads the first images, the UNet half the ones after, whichever parts run;
    a folder of the UNet half's own is read from its first image."""
    shared = _folder(tmp_path / "unsafe", 48)
    run = TINY_RUN | UNET_RUN | {"parts": ["decoder", "unet"], "bank": TINY_RUN["bank"] | {"unsafe_dir": str(shared)}}
    both = _config(tmp_path, run)
    decoder, unet = blocks(both)
    assert (decoder.start, decoder.end, unet.start, unet.end) == (0, 32, 32, 48)  # bank 16+8+8, unet 8+4+4
    pipe = load_pipeline(mini_pipeline)
    parts = load_partitions(pipe, both)
    read = [int(t.split()[1]) for part in ("train", "query", "probe") for t in parts[part, "unsafe"].texts]
    assert read == list(range(32, 48))
    unet_only = _config(tmp_path, run | {"parts": ["unet"]}, "unet.json")
    assert load_partitions(pipe, unet_only)["train", "unsafe"].texts == parts["train", "unsafe"].texts
    own = _folder(tmp_path / "unet-unsafe", 16)
    separate = _config(tmp_path, run | {"unet": UNET_RUN["unet"] | {"unsafe_dir": str(own)}}, "own.json")
    assert [b.start for b in blocks(separate)] == [0, 0]
    assert load_partitions(pipe, separate)["train", "unsafe"].texts == [f"image {i}" for i in range(8)]


def test_too_few_images_are_refused_in_one_line_before_any_work(tmp_path):
    unsafe, benign = _folder(tmp_path / "unsafe", 400), _folder(tmp_path / "benign", 400, BENIGN)
    (tmp_path / "c.toml").write_text(f'[bank]\nunsafe_dir = "{unsafe}"\nbenign_dir = "{benign}"\n')
    r = run_cli("protect", "patronus-tiny", "--preset", "quick", "--config", str(tmp_path / "c.toml"),
                "--out", str(tmp_path / "o"))
    # The quick preset: 192 + 64 + 64 unsafe images for the decoder half, 128 + 32 + 16 for the UNet half.
    assert_clean_error(r, f"{unsafe} has 400 images; this run needs 496: images 0-319 for the decoder half "
                          "(bank.n_train + n_query + n_probe = 192 + 64 + 64) and images 320-495 for the UNet half")
    assert "give the UNet half a folder of its own (unet.unsafe_dir)" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


def test_too_few_prompts_are_refused_before_any_work(mini_pipeline, tmp_path):
    prompts = tmp_path / "unsafe.txt"
    prompts.write_text("a knife\n" * 20)
    cfg = _config(tmp_path, TINY_RUN | {"bank": TINY_RUN["bank"] | {"unsafe_prompts": str(prompts)}})
    with pytest.raises(ConfigError, match="unsafe.txt has 20 prompts; this run needs 32: prompts 0-31 for the "
                                          r"decoder half \(bank.n_train \+ n_query \+ n_probe = 16 \+ 8 \+ 8\)"):
        protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_the_fidelity_gate_chooses_a_checkpoint_without_labels(mini_pipeline, tmp_path):
    """Image folders carry no class labels and NudeNet names no class: the UNet half's probes hold
    its benign samples against the original UNet's, and the gate and ranking use that alone."""
    folders = {"unsafe_dir": str(_folder(tmp_path / "unsafe", 16)),
               "benign_dir": str(_folder(tmp_path / "benign", 12, BENIGN))}
    run = UNET_RUN | {"probe_detector": "nudenet", "unet": UNET_RUN["unet"] | folders | {"gate": "fidelity"}}
    lax = protect(str(mini_pipeline), tmp_path / "lax", _config(tmp_path, run), tmp_path / "lax.work")
    probes = lax["unet"]["probes"]
    assert all(p["benign_class_match"] is None and p["feasible"] for p in probes)
    # A bar between the probes' PSNRs: the probes are the same (the bar only chooses), some fail it.
    bar = sorted(p["benign_psnr"] for p in probes)[len(probes) // 2]
    run["unet"] = run["unet"] | {"min_benign_psnr": bar}
    strict = protect(str(mini_pipeline), tmp_path / "strict", _config(tmp_path, run, "strict.json"),
                     tmp_path / "strict.work")
    probes = strict["unet"]["probes"]
    assert [p["feasible"] for p in probes] == [p["benign_psnr"] >= bar for p in probes]
    assert not all(p["feasible"] for p in probes)
    best = max(probes, key=lambda p: (p["feasible"], p["score"], p["benign_psnr"]))
    assert strict["unet"]["chosen_checkpoint"] == best
    assert strict["data"]["unet"]["first_image"] == {"unsafe": 0, "benign": 0}  # the UNet half's own folders


def test_nudenet_scores_the_decoder_halfs_probes(mini_pipeline, tmp_path):
    info = protect(str(mini_pipeline), tmp_path / "out", _config(tmp_path, TINY_RUN | {"probe_detector": "nudenet"}),
                   tmp_path / "work")
    assert info["config"]["probe_detector"] == "nudenet"
    assert all(0 <= p["unsafe_score_after_probe"] <= 1 for p in info["decoder"]["probes"])
