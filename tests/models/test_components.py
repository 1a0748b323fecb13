import pytest
import torch

from patronus.models.components import DecoderHead, encode_latents, reinitialise
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
