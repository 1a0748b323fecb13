import copy

import pytest
import torch

from patronus.models.components import (
    DecoderHead,
    encode_latents,
    hold_frozen_in,
    plain_image,
    plain_latent,
    reinitialise,
)
from patronus.models.registry import load_pipeline


@pytest.fixture(scope="module")
def pipe(mini_pipeline):
    return load_pipeline(mini_pipeline)


def test_reinitialise_redraws_the_decoder_and_keeps_the_encoder(pipe):
    vae = pipe.vae
    s = reinitialise({"vae": vae}, {"decoder"}, seed=1)["vae"]
    assert s is not vae and torch.equal(s.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not torch.equal(s.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert torch.equal(reinitialise({"vae": vae}, {"decoder"}, seed=1)["vae"].decoder.conv_out.weight,
                       s.decoder.conv_out.weight)  # the same seed draws the same decoder
    assert not torch.equal(reinitialise({"vae": vae}, {"decoder"}, seed=2)["vae"].decoder.conv_out.weight,
                           s.decoder.conv_out.weight)


def test_reinitialise_returns_only_the_parts_asked_for(pipe):
    fresh = reinitialise(pipe.components, {"unet", "text_encoder"}, seed=0)
    assert set(fresh) == {"unet", "text_encoder"}
    assert not torch.equal(next(fresh["unet"].parameters()), next(pipe.unet.parameters()))
    with pytest.raises(ValueError, match="cannot re-initialise"):
        reinitialise(pipe.components, {"encoder"}, seed=0)


def test_encode_latents_matches_the_vae_and_decoder_head_matches_decode(pipe):
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encode_latents(pipe.vae, x, batch_size=2, with_std=True)
    with torch.no_grad():
        d = pipe.vae.encode(x).latent_dist
        torch.testing.assert_close(mean, d.mean)
        torch.testing.assert_close(std, d.std)
        torch.testing.assert_close(DecoderHead(pipe.vae)(mean), pipe.vae.decode(mean).sample)


def test_a_frozen_copy_in_bfloat16_takes_and_gives_float32(pipe):
    """frozen_dtype = "bfloat16": the teacher's weights in half the memory, its callers unchanged."""
    unet = pipe.unet
    low = hold_frozen_in(copy.deepcopy(unet), "bfloat16")
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert hold_frozen_in(unet, "float32") is unet and unet.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    h = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = unet(x, torch.tensor([10, 500]), h, return_dict=False)[0]
        got = low(x, torch.tensor([10, 500]), encoder_hidden_states=h).sample
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding, not another function
    with pytest.raises(ValueError, match="float16"):
        hold_frozen_in(unet, "float16")


def test_plain_latent_is_the_encoders_latent_or_one_the_decoder_renders_closer_to_the_colour(pipe):
    vae, r = pipe.vae, pipe.vae.config.sample_size
    grey = plain_image((150, 150, 150), r)
    assert grey.shape == (1, 3, r, r) and torch.allclose(grey, torch.full_like(grey, 150 / 127.5 - 1))
    encoded = plain_latent(vae, (150, 150, 150), r)
    torch.testing.assert_close(encoded, encode_latents(vae, grey))
    fitted = plain_latent(vae, (150, 150, 150), r, inversion_steps=20)
    with torch.no_grad():
        error = [(vae.decode(z, return_dict=False)[0] - grey).pow(2).mean().item() for z in (encoded, fitted)]
    assert error[1] < error[0] and not fitted.requires_grad
    torch.testing.assert_close(fitted, plain_latent(vae, (150, 150, 150), r, inversion_steps=20))  # deterministic
