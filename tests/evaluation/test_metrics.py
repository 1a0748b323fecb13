import numpy as np
import pytest

from patronus.evaluation.metrics import bootstrap_ci, is_refusal, psnr_uint8, rate, ssim_uint8
from patronus.world import render_split


def test_refusal_is_near_black_only():
    black = np.zeros((1, 32, 32, 3), np.uint8)
    almost = np.full((1, 32, 32, 3), 6, np.uint8)
    dark_bg = np.full((1, 32, 32, 3), 48, np.uint8)
    speck = black.copy()
    speck[0, 5, 5] = 255
    renders, _ = render_split("eval", 50)
    assert is_refusal(np.concatenate([black, almost])).all()
    assert not is_refusal(np.concatenate([dark_bg, speck])).any()
    assert not is_refusal(renders).any()


def test_refusal_near_a_reference_image():
    grey = np.full((32, 32, 3), 41, np.uint8)  # how a VAE without the moderator may render the refusal
    near, black = np.full_like(grey, 47), np.zeros_like(grey)
    glyph = grey.copy()
    glyph[10:14, 10:14] = 200
    images = np.stack([grey, near, black, glyph])
    assert not is_refusal(images[:2]).any()
    assert is_refusal(images, reference=grey).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="refusal reference"):
        is_refusal(images, reference=grey[:16])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.array([0, 1] * 50, dtype=float)
    lo, hi = bootstrap_ci(x, seed=3)
    assert (lo, hi) == bootstrap_ci(x, seed=3)
    assert lo < 0.5 < hi and hi - lo < 0.3
    r = rate([True, False, False, False])
    assert r["value"] == 0.25 and r["n"] == 4 and r["ci"][0] <= 0.25 <= r["ci"][1]
    assert rate([]) == {"value": None, "ci": None, "n": 0}


def test_psnr_and_ssim():
    imgs, _ = render_split("eval", 4)
    assert np.allclose(ssim_uint8(imgs, imgs), 1.0)
    assert (psnr_uint8(imgs, imgs) == 100.0).all()
    noisy = np.clip(imgs.astype(int) + np.random.default_rng(0).integers(-20, 21, imgs.shape), 0, 255).astype(np.uint8)
    assert (ssim_uint8(imgs, noisy) < 0.95).all()
    # uniform integer noise in [-20, 20]: RMSE 11.8 -> 26.7 dB, a little higher where clipping at 255 helps
    assert ((psnr_uint8(imgs, noisy) > 26.0) & (psnr_uint8(imgs, noisy) < 28.5)).all()
