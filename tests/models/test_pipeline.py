import json
import os
import subprocess
import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from patronus.models.registry import TINY_DIR, load_pipeline, resolve_model
from patronus.models.sampling import generate


def test_shipped_pipeline_loads_offline_with_plain_diffusers():
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "p = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "img = p('a red knife on a white background', num_inference_steps=3, output_type='np',\n"
        "        generator=torch.Generator().manual_seed(0)).images\n"
        "print(type(p.unet).__name__, type(p.vae).__name__, type(p.text_encoder).__name__,\n"
        "      type(p.tokenizer).__name__, p.safety_checker, img.shape)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, str(TINY_DIR)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "UNet2DConditionModel AutoencoderKL CLIPTextModel CLIPTokenizer None (1, 32, 32, 3)" in out.stdout


def test_shipped_directory_is_a_standard_pipeline():
    index = json.loads((TINY_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None]
    files = [p for p in TINY_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_name_resolves_to_shipped_dir():
    assert resolve_model("patronus-tiny") == TINY_DIR


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
    pipe = load_pipeline("patronus-tiny")
    pipe.save_pretrained(tmp_path)
    again = StableDiffusionPipeline.from_pretrained(tmp_path)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    again.set_progress_bar_config(disable=True)
    prompts, seeds = ["a blue star on a gray background", "a red gun on a white background"], [1, 2]
    assert np.array_equal(generate(pipe, prompts, seeds, steps=4), generate(again, prompts, seeds, steps=4))


def test_generation_depends_only_on_prompt_and_seed():
    pipe = load_pipeline("patronus-tiny")
    prompts = ["a green heart on a beige background", "a purple moon on a dark background", "a red circle"]
    together = generate(pipe, prompts, [5, 6, 7], steps=4, batch_size=3)
    alone = generate(pipe, prompts[1:2], [6], steps=4, batch_size=1)
    assert np.abs(together[1].astype(int) - alone[0].astype(int)).max() <= 1


def test_generate_decodes_exactly_as_the_pipeline_does():
    pipe = load_pipeline("patronus-tiny")
    prompts, seeds = ["a red gun on a white background", "a blue star on a gray background"], [3, 4]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    direct = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, generator=gens, output_type="np").images
    ours = generate(pipe, prompts, seeds, steps=3, guidance=4.0)
    assert np.array_equal(ours, (direct * 255).round().astype(np.uint8))
