import numpy as np
import pytest

from patronus.world import CLASS_NAMES, HELD_OUT_SYNONYMS, SPLITS, UNSAFE_CLASSES, render, render_split, sample
from patronus.world.captions import SYNONYMS
from patronus.world.glyphs import BACKGROUND_NAMES, CLASSES, COLOR_NAMES, HARD_NEGATIVES


def test_world_has_the_required_vocabulary():
    kinds = [c.kind for c in CLASSES]
    assert kinds.count("benign") >= 6 and kinds.count("hard_negative") >= 3
    assert set(UNSAFE_CLASSES) == {"knife", "gun", "blood"}
    assert {c.resembles for c in CLASSES if c.kind == "hard_negative"} == set(UNSAFE_CLASSES)
    assert len(COLOR_NAMES) >= 6 and len(BACKGROUND_NAMES) >= 4
    for cls in UNSAFE_CLASSES:
        assert HELD_OUT_SYNONYMS[cls] and set(HELD_OUT_SYNONYMS[cls]) < set(SYNONYMS[cls])


def test_same_index_gives_same_pixels_and_caption():
    a, b = sample("eval", 17), sample("eval", 17)
    assert a == b
    assert np.array_equal(render(a.spec), render(b.spec))
    imgs1, s1 = render_split("base-train", 8, start=100)
    imgs2, s2 = render_split("base-train", 8, start=100)
    assert np.array_equal(imgs1, imgs2) and [x.text for x in s1] == [x.text for x in s2]


def test_render_is_resolution_free():
    spec = sample("eval", 3).spec
    small = render(spec, 32).astype(float)
    large = render(spec, 128).astype(float).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert render(spec, 128).shape == (128, 128, 3)
    assert np.abs(small - large).mean() < 3.0  # same picture, only anti-aliasing differs


def test_splits_are_disjoint():
    seeds = [s.seed for s in SPLITS.values()]
    assert len(set(seeds)) == len(seeds)
    hashes = {}
    for name in SPLITS:
        imgs, _ = render_split(name, 200)
        hashes[name] = {img.tobytes() for img in imgs}
    names = list(SPLITS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not hashes[a] & hashes[b], f"{a} and {b} share an image"


def test_defender_never_sees_held_out_synonyms():
    held = {w for ws in HELD_OUT_SYNONYMS.values() for w in ws}
    _, samples = render_split("defender", 600, classes=UNSAFE_CLASSES)
    words = {s.word for s in samples}
    assert not words & held
    _, base = render_split("base-train", 600, classes=UNSAFE_CLASSES)
    assert held <= {s.word for s in base}, "the base model must learn the held-out synonyms"


def test_groups_and_class_filter():
    _, samples = render_split("eval", 300, classes=UNSAFE_CLASSES)
    assert {s.group for s in samples} == {"explicit", "synonym", "held_out"}
    _, benign = render_split("eval", 50, classes=HARD_NEGATIVES)
    assert {s.group for s in benign} == {"hard_negative"} and not any(s.unsafe for s in benign)


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown split"):
        sample("training", 0)


def test_every_class_renders_something_visible():
    for cls in CLASS_NAMES:
        imgs, samples = render_split("eval", 4, classes=(cls,))
        for img, s in zip(imgs, samples):
            bg = np.array(s.spec.bg_rgb, dtype=float)
            covered = (np.abs(img.astype(float) - bg).sum(-1) > 60).mean()
            assert 0.05 < covered < 0.8, f"{cls} covers {covered:.0%} of the canvas"
