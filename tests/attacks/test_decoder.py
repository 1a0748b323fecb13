import pytest
import torch
import torch.nn.functional as F

from patronus.attacks.weights.decoder import DecoderAttackConfig, attack_decoder, load_head_state
from patronus.imaging import to_tensor
from patronus.models.components import DecoderHead
from patronus.models.tiny import build_vae
from patronus.world import UNSAFE_CLASSES, render_split
from tests.conftest import MINI_CONFIG


@pytest.fixture(scope="module")
def vae_and_images():
    torch.manual_seed(0)
    images, _ = render_split("attacker", 32, classes=UNSAFE_CLASSES)
    return build_vae(MINI_CONFIG).eval(), to_tensor(images)


def _recon_error(vae, x):
    with torch.no_grad():
        return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


@pytest.mark.parametrize("rank", [None, 4])
def test_attack_reduces_reconstruction_error_and_leaves_victim_alone(vae_and_images, rank):
    vae, x = vae_and_images
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    attack = DecoderAttackConfig("adam", 1e-3, steps=30, batch_size=8, lora_rank=rank, save_at=(5, 30))
    saved = attack_decoder(vae, x, attack)
    assert sorted(saved) == [5, 30]
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    attacked = load_head_state(vae, saved[30])
    assert _recon_error(attacked, x) < _recon_error(vae, x)
    assert torch.equal(attacked.encoder.conv_in.weight, vae.encoder.conv_in.weight)


def test_bad_attack_settings_are_refused_on_construction():
    with pytest.raises(ValueError, match="unknown optimizer"):
        DecoderAttackConfig("lion", 1e-3, steps=1, save_at=(1,))
    with pytest.raises(ValueError, match="save_at"):
        DecoderAttackConfig("adam", 1e-3, steps=1, save_at=(2,))


def test_a_clipping_attacker_steps_by_lr_times_the_clip_norm(vae_and_images):
    """One SGD step (the momentum buffer starts at the gradient): the decoder head moves by lr x
    the clip norm, and clipping only rescales the unclipped step."""
    vae, x = vae_and_images
    before = DecoderHead(vae).state_dict()

    def step(max_norm):
        attack = DecoderAttackConfig("sgd", 1e-2, steps=1, batch_size=8, save_at=(1,), max_grad_norm=max_norm)
        after = attack_decoder(vae, x, attack)[1]
        move = {k: after[k] - before[k] for k in before}
        return move, torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in move.values()])).item()

    free, free_norm = step(None)
    clip = free_norm / 1e-2 / 4  # a quarter of the gradient's norm
    clipped, clipped_norm = step(clip)
    assert clipped_norm == pytest.approx(1e-2 * clip, rel=1e-3)
    for k in before:
        torch.testing.assert_close(clipped[k] * 4, free[k], rtol=1e-3, atol=1e-6)  # fp32 weights: ~1e-7 each


@pytest.mark.parametrize("value", [0, -1.0, float("inf")])
def test_a_bad_clip_norm_is_refused_on_construction(value):
    with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number"):
        DecoderAttackConfig("adam", 1e-3, steps=1, save_at=(1,), max_grad_norm=value)
