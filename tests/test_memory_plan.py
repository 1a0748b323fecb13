"""benchmarks/memory_plan.py counts activations on fake tensors: the count must be what real
tensors save, and the memory features must lower it."""

import sys
from pathlib import Path

import torch

from patronus.models.sd15 import SDShapedConfig, build_unet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import memory_plan  # noqa: E402


def test_fake_tensors_count_what_real_tensors_save():
    torch.manual_seed(0)
    unet = build_unet(SDShapedConfig(widths="narrow", resolution=64)).requires_grad_(True)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
    real = memory_plan.saved_bytes(unet, lambda: unet(x, t, h, return_dict=False)[0], None, None)
    fp32, bf16 = memory_plan.measure("narrow", 64, "no"), memory_plan.measure("narrow", 64, "bf16")
    assert fp32.unet_train == real
    assert fp32.unet_train_ckpt < fp32.unet_train and fp32.decoder_train_ckpt < fp32.decoder_train
    assert bf16.unet_train < fp32.unet_train and bf16.decoder_train < fp32.decoder_train
    assert fp32.unet == sum(p.numel() for p in unet.parameters()) * 4
