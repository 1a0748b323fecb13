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
    # At 64 px bf16 can keep more than float32: every cross-attention layer saves its own bf16
    # copy of the 77-token prompt embedding. At 256 px the halved activations win.
    assert bf16.decoder_train < fp32.decoder_train
    fp32, bf16 = memory_plan.measure("narrow", 256, "no"), memory_plan.measure("narrow", 256, "bf16")
    assert bf16.unet_train < fp32.unet_train and bf16.decoder_train < fp32.decoder_train
    # The same count every time: storages are told apart by address, so none may be freed and
    # reused before the count is done (before 2026-12-02, bf16 counts varied by about 1% and missed 10%).
    assert memory_plan.measure("narrow", 256, "bf16") == bf16
    assert fp32.unet == sum(p.numel() for p in unet.parameters()) * 4
