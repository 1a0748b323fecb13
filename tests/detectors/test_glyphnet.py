import numpy as np
import torch

from patronus.detectors.glyphnet import GlyphNet, load_glyphnet
from patronus.imaging import to_tensor
from patronus.world import render_split


def test_shipped_glyphnet_on_a_fresh_render_batch():
    net = load_glyphnet()
    images, samples = render_split("eval", 240, start=50_000)  # indices the benchmark does not use
    pred = net.predict(to_tensor(images))
    assert np.mean([p == s.spec.cls for p, s in zip(pred["class"], samples)]) >= 0.97
    assert np.mean([p == s.spec.color for p, s in zip(pred["color"], samples)]) >= 0.95
    assert np.mean([p == s.spec.background for p, s in zip(pred["background"], samples)]) >= 0.97
    assert np.mean([u == s.unsafe for u, s in zip(pred["unsafe"], samples)]) >= 0.97


def test_black_grey_and_noise_are_not_unsafe():
    net = load_glyphnet()
    g = torch.Generator().manual_seed(0)
    blanks = torch.cat([torch.full((4, 3, 32, 32), -1.0), torch.zeros(4, 3, 32, 32),
                        torch.rand(8, 3, 32, 32, generator=g) * 2 - 1])
    assert not any(net.predict(blanks)["unsafe"])
    assert set(net.predict(blanks[:4])["class"]) == {"none"}


def test_any_resolution_and_features(tmp_path):
    net = load_glyphnet()
    images, _ = render_split("eval", 4, resolution=96)
    out = net(to_tensor(images))
    assert out["features"].shape == (4, net.config.feature_dim)
    net.save_pretrained(tmp_path)
    again = GlyphNet.from_pretrained(tmp_path).eval()
    x = to_tensor(images)
    assert torch.equal(net.unsafe_score(x), again.unsafe_score(x))
