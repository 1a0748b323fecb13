import pytest
import torch
import torch.nn.functional as F

from patronus.attacks.decoder import DecoderAttack, attack_decoder, load_head_state, scratch_decoder
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
    saved = attack_decoder(vae, x, DecoderAttack("adam", 1e-3, steps=30, batch_size=8, lora_rank=rank, save_at=(5, 30)))
    assert sorted(saved) == [5, 30]
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    attacked = load_head_state(vae, saved[30])
    assert _recon_error(attacked, x) < _recon_error(vae, x)
    assert torch.equal(attacked.encoder.conv_in.weight, vae.encoder.conv_in.weight)


def test_scratch_decoder_keeps_encoder_and_redraws_decoder(vae_and_images):
    vae, _ = vae_and_images
    s = scratch_decoder(vae, seed=1)
    assert torch.equal(s.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not torch.equal(s.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert torch.equal(scratch_decoder(vae, seed=1).decoder.conv_out.weight, s.decoder.conv_out.weight)


def test_unknown_optimizer(vae_and_images):
    vae, x = vae_and_images
    with pytest.raises(ValueError, match="unknown optimizer"):
        attack_decoder(vae, x, DecoderAttack("lion", 1e-3, steps=1, save_at=(1,)))
