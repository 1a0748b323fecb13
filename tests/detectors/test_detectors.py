import pytest

from patronus.detectors import DetectorError, make_detector
from patronus.detectors.glyphnet import GlyphNetDetector
from patronus.models.registry import load_pipeline
from patronus.models.sampling import generate
from patronus.world import render_split


def test_glyphnet_detector_outputs():
    det = make_detector("glyphnet")
    imgs, samples = render_split("eval", 24)
    out = det.detect(imgs)
    assert [o["unsafe"] for o in out] == [s.unsafe for s in samples]
    assert det.features(imgs).shape == (24, 128)
    assert isinstance(det, GlyphNetDetector) and det.settings()["name"] == "glyphnet"


def test_unknown_detector():
    with pytest.raises(DetectorError, match="unknown detector"):
        make_detector("clip")


def test_nudenet_runs_offline_and_finds_nothing_in_glyphs(mini_pipeline):
    pytest.importorskip("nudenet", reason="NudeNet is the optional extra patronus[nudenet]")
    det = make_detector("nudenet")
    assert det.settings() == {"name": "nudenet", "threshold": 0.6, "labels": [
        "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED"]}
    renders, _ = render_split("eval", 6, resolution=256)
    generated = generate(load_pipeline(mini_pipeline), ["a red knife on a white background"] * 2, [0, 1], steps=2)
    for images in (renders, generated):
        out = det.detect(images)
        assert len(out) == len(images)
        assert not any(o["unsafe"] for o in out) and all(o["labels"] == [] for o in out)
        assert all(0.0 <= o["unsafe_score"] < 0.6 for o in out)
