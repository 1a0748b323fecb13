"""The in-memory UNet attack that `patronus protect`'s probes and anchored NFT run."""

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from patronus.attacks.weights.unet import UNetAttackConfig, attack_unet


def _move(before: dict, after: torch.nn.Module) -> dict:
    return {k: v.detach() - before[k] for k, v in after.named_parameters()}


def _norm(move: dict) -> float:
    """The global norm of a move over every parameter (also the NFT attacker's tests')."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in move.values()])).item()


def test_a_clipping_attacker_steps_by_lr_times_the_clip_norm(mini_pipeline):
    """One SGD step (the momentum buffer starts at the gradient) moves the UNet by lr x the clip
    norm, in the unclipped step's direction (clipped to a quarter of the gradient's norm: a
    quarter of its step); the UNet attacked is left as it was."""
    pipe = StableDiffusionPipeline.from_pretrained(mini_pipeline)
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    before = {k: v.detach().clone() for k, v in unet.named_parameters()}
    g = torch.Generator().manual_seed(0)
    shape = (8, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    mean, std = torch.randn(shape, generator=g), torch.full(shape, 0.1)
    hidden = torch.randn(8, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=g)
    def step(max_norm):
        return _move(before, attack_unet(unet, scheduler, mean, std, hidden, 1.0,
                                         UNetAttackConfig("sgd", 1e-2, 1, 4, max_grad_norm=max_norm)))

    free = step(None)
    clip = _norm(free) / 1e-2 / 4  # a quarter of the gradient's norm
    clipped = step(clip)
    assert all(torch.equal(before[k], v) for k, v in unet.named_parameters())
    assert _norm(clipped) == pytest.approx(1e-2 * clip, rel=1e-3)
    for k in before:
        torch.testing.assert_close(clipped[k] * 4, free[k], rtol=1e-3, atol=1e-6)  # fp32 weights: ~1e-7 each


@pytest.mark.parametrize("value", [0, -2.0, float("nan"), True])
def test_a_bad_clip_norm_is_refused_on_construction(value):
    with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number"):
        UNetAttackConfig(max_grad_norm=value)


def test_a_clipping_lora_attacker_clips_the_lora_factors_it_trains(mini_pipeline, monkeypatch):
    """The clip covers exactly the parameters the optimizer trains: every LoRA factor, no base weight."""
    pipe = StableDiffusionPipeline.from_pretrained(mini_pipeline)
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(params, norm):
        clipped.append(params)
        return clip(params, norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    shape = (4, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    hidden = torch.zeros(4, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    attack_unet(unet, scheduler, torch.zeros(shape), torch.ones(shape), hidden, 1.0,
                UNetAttackConfig("adam", 1e-3, 2, 2, lora_rank=2, max_grad_norm=1.0))
    assert len(clipped) == 2 and all(p.requires_grad for p in clipped[0])
    n_lora = sum(2 for m in unet.modules() for name in ("to_q", "to_k", "to_v") if hasattr(m, name))
    n_lora += sum(2 for m in unet.modules() if hasattr(m, "to_out"))
    assert len(clipped[0]) == n_lora  # A and B of every targeted projection, nothing else
