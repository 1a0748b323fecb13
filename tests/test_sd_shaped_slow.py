"""The real-model path end to end on a pipeline with SD 1.5's component architectures, run from
the example configs a user of a real checkpoint starts from (examples/sd15/).

Random weights at 64 px (`patronus.models.sd15`, narrow widths, the full CLIP ViT-L/14 text
encoder), the data laid out as examples/sd15/README.md says. `protect` reads
examples/sd15/protect.toml (VGG-19 perceptual loss from random weights as safetensors, NudeNet
probes, gradient checkpointing, VAE slicing, a shared bank cache) with only its sizes and step
counts cut; every attack kind runs with the memory flags and once under bf16 autocast;
`evaluate` reads an I2P-format CSV and a caption list with NudeNet; `patronus sweep` runs
examples/sd15/grid.toml with its budgets and learning rates cut. What it proves is that the
paths run and write what they promise; random weights have nothing to protect.

    pytest -m slow tests/test_sd_shaped_slow.py
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from patronus.attacks.registry import ATTACKS
from patronus.models.sd15 import SDShapedConfig, write
from patronus.world.glyphs import CLASS_NAMES, UNSAFE_CLASSES
from patronus.world.splits import export_imagefolder
from tests.test_examples import SD15, materialise

pytestmark = pytest.mark.slow

# examples/sd15/protect.toml's counts and steps cut to a few: this is about the path, not the result.
SMALL = {
    "batch_size": 4, "query_batch": 4, "stage1_steps": 3, "stage2_steps": 2, "probe_every": 2, "probe_steps": 2,
    "probe_batch": 2, "checkpoint_every": 2,
    "attacks": {"inner_steps": [1, 2], "batch_sizes": [2, 2], "queries_per_attack": 1},
    "bank": {"n_train": 8, "n_query": 4, "n_probe": 4, "sampler_steps": 2},
    "unet": {"n_train": 8, "n_query": 4, "n_probe": 4, "batch_size": 2, "query_batch": 2, "align_steps": 2,
             "align_warmup": 1, "nft_steps": 2, "probe_every": 2, "probe_steps": 2, "probe_batch": 2,
             "probe_samples": 2, "probe_sampler_steps": 2, "checkpoint_every": 2,
             "attacks": {"inner_steps": [1, 2], "batch_sizes": [2, 2], "queries_per_attack": 1}},
}
# examples/sd15/grid.toml's budgets, learning rates, ranks and batch cut; its kinds, references,
# data and evaluation (prompt files, NudeNet) as they are.
SMALL_GRID = {"budgets": [2], "lrs": [1e-4], "ranks": [4], "batch_size": 2, "eval": {"steps": 3}}


def _cli(*args: str, env: dict | None = None) -> str:
    run = subprocess.run([sys.executable, "-m", "patronus", *args], capture_output=True, text=True, timeout=1200,
                         env=os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {}))
    assert run.returncode == 0, (args, run.stderr[-3000:])
    return run.stdout


def _lay_out(root: Path, sd: Path) -> None:
    """examples/sd15/README.md's layout, filled from the glyph world at 64 px."""
    benign = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    for split, n in (("defender", 32), ("attacker", 8)):
        for kind, classes in (("unsafe", UNSAFE_CLASSES), ("benign", benign)):
            if split == "defender" or kind == "unsafe":
                export_imagefolder(split, n, root / split / kind, 64, classes)
    (root / "prompts").mkdir()
    (root / "prompts" / "i2p.csv").write_text(
        "prompt,categories,hard,inappropriate_percentage,nudity_percentage,sd_seed,sd_guidance_scale\n"
        + "".join(f'"a nude figure, study {i}",sexual,1,90.0,80.0,{1000 + i},7\n' for i in range(16)))
    (root / "prompts" / "coco.txt").write_text("".join(f"a cat sitting on a red couch, photo {i}\n" for i in range(12)))
    (root / "weights").mkdir()
    shutil.copy(sd / "vgg19.safetensors", root / "weights" / "vgg19.safetensors")


def test_sd_shaped_pipeline_through_the_sd15_examples(tmp_path):
    t0 = time.time()
    sd = tmp_path / "sd15-narrow"
    write(sd, SDShapedConfig(widths="narrow", resolution=64))
    unet = StableDiffusionPipeline.from_pretrained(sd).unet.config
    assert unet.cross_attention_dim == 768 and unet.layers_per_block == 2
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    data = tmp_path / "data"
    _lay_out(data, sd)

    protected = tmp_path / "protected"
    config = materialise(SD15 / "protect.toml", data, SMALL)
    _cli("protect", str(sd), "--preset", "quick", "--config", str(config), "--out", str(protected))
    info = json.loads((protected / "patronus.json").read_text())
    assert info["parts"] == ["decoder", "unet"] and info["config"]["perceptual"] == "vgg19"
    assert info["config"]["probe_detector"] == "nudenet" and info["config"]["gradient_checkpointing"]
    assert sorted(info["changed_weight_files"]) == ["unet/diffusion_pytorch_model.safetensors",
                                                    "vae/diffusion_pytorch_model.safetensors"]
    # One cached bank per UNet the decoder learns (original, aligned), in the shared cache folder.
    assert info["config"]["bank"]["unet_sources"] == ["original", "aligned"]
    assert len(list((data / "bank-cache").glob("feature-bank-*.safetensors"))) == 2
    StableDiffusionPipeline.from_pretrained(protected)

    memory = ["--gradient-checkpointing", "--vae-slicing"]
    for kind in ATTACKS:
        out = tmp_path / "attacks" / kind
        extra = ["--from", str(sd)] if kind == "swap-decoder" else ["--data", str(data / "attacker" / "unsafe")]
        _cli("attack", str(protected), "--kind", kind, "--steps", "2", "--batch-size", "2", "--rank", "4",
             "--out", str(out), *extra, *memory)
        assert (out / "attack.json").exists() and list(out.glob("step-*/model_index.json")), kind
    # Mixed precision as accelerate configures it (bf16 autocast also runs on a CPU).
    _cli("attack", str(protected), "--kind", "unet-full", "--steps", "2", "--batch-size", "2",
         "--data", str(data / "attacker" / "unsafe"), "--out", str(tmp_path / "attacks" / "unet-full-bf16"),
         env={"ACCELERATE_MIXED_PRECISION": "bf16"})

    out = tmp_path / "eval-protected"
    _cli("evaluate", str(protected), "--detector", "nudenet", "--unsafe-prompts", str(data / "prompts" / "i2p.csv"),
         "--benign-prompts", str(data / "prompts" / "coco.txt"), "--reference", str(sd), "--steps", "3",
         "--vae-slicing", "--out", str(out))
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["unsafe_rate"]["n"] == 16 and result["settings"]["detector"]["name"] == "nudenet"
    assert result["metrics"]["psnr_vs_reference"]["n"] == 12

    sweep = tmp_path / "sweep"
    grid = materialise(SD15 / "grid.toml", data, SMALL_GRID)
    _cli("sweep", str(protected), "--unprotected", str(sd), "--grid", str(grid), "--out", str(sweep))
    cells = json.loads((sweep / "sweep.json").read_text())["cells"]
    assert {c["cell"]["kind"] for c in cells} == {"unet-full", "unet-lora", "decoder-full", "joint"}
    assert {c["model"] for c in cells} >= {"protected", "unprotected"}
    _cli("report", str(sweep), "--out", str(tmp_path / "report"))
    print(f"SD-shaped end to end: {time.time() - t0:.0f} s")
