import pytest
import torch
import torch.nn.functional as F

from patronus.attacks.weights.decoder import DecoderAttackConfig, attack_decoder, load_head_state
from patronus.imaging import to_tensor
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
