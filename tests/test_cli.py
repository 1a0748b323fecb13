import json
import shutil
import subprocess
import sys

import pytest
import torch

from patronus.models.registry import TINY_DIR


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "patronus", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_clean_error(result, needle):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_generate_end_to_end_writes_pngs_and_grid(tmp_path):
    out = tmp_path / "gen"
    r = run_cli("generate", "patronus-tiny", "a red knife on a white background", "--n", "4", "--steps", "5",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                          "grid.png"]


def test_nonexistent_model(tmp_path):
    r = run_cli("generate", str(tmp_path / "missing"), "a red circle", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "not found")
    assert not (tmp_path / "o").exists()


def test_directory_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notapipe").mkdir()
    r = run_cli("generate", str(tmp_path / "notapipe"), "a red circle", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "not a diffusers pipeline")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_corrupt_weights_file(tmp_path, component):
    broken = tmp_path / "broken"
    shutil.copytree(TINY_DIR, broken)
    weights = next((broken / component).glob("*.safetensors"))
    weights.write_bytes(b"this is not a safetensors file")
    r = run_cli("generate", str(broken), "a red circle", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "cannot load pipeline")
    assert not (tmp_path / "o").exists()


def test_existing_output_dir_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    r = run_cli("generate", "patronus-tiny", "a red circle", "--n", "1", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "not empty")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("metadata,needle", [(None, "no metadata.jsonl"), ('{"file_name": "a.png"', "not JSON lines"),
                                             ('{"file_name": "missing.png", "text": "a knife"}', "cannot read image")])
def test_attack_with_a_bad_image_folder(tmp_path, metadata, needle):
    data = tmp_path / "data"
    data.mkdir()
    if metadata is not None:
        (data / "metadata.jsonl").write_text(metadata + "\n")
    r = run_cli("attack", "patronus-tiny", "--kind", "decoder-full", "--data", str(data), "--steps", "1",
                "--out", str(tmp_path / "o"))
    assert_clean_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_sweep_with_a_bad_grid_file(tmp_path):
    (tmp_path / "grid.yaml").write_text("kinds: [unet-full]\nlrs: [1e-5]\n")
    r = run_cli("sweep", "patronus-tiny", "--grid", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "o"))
    assert_clean_error(r, "YAML reads 1e-5 as text")
    assert not (tmp_path / "o").exists()


def test_attack_bad_rank_and_foreign_vae(tmp_path):
    r = run_cli("attack", "patronus-tiny", "--kind", "unet-lora", "--rank", "0", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "--rank must be at least 1")
    r = run_cli("attack", "patronus-tiny", "--kind", "joint", "--max-grad-norm", "0", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "--max-grad-norm must be a positive")
    other = tmp_path / "other"
    shutil.copytree(TINY_DIR, other)
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps(config | {"scaling_factor": 0.5}))
    r = run_cli("attack", "patronus-tiny", "--kind", "swap-decoder", "--from", str(other), "--out", str(tmp_path / "o"))
    assert_clean_error(r, "scaling_factor")
    assert not (tmp_path / "o").exists()


def test_demo_and_protect_refuse_a_file_as_out(tmp_path):
    (tmp_path / "f").write_text("x")
    assert_clean_error(run_cli("demo", "--out", str(tmp_path / "f")), "is a file")
    assert_clean_error(run_cli("protect", "patronus-tiny", "--out", str(tmp_path / "f")), "is a file")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("args,config,needle", [
    (["--preset", "huge"], None, "unknown preset 'huge'"),
    (["--defense", "none"], None, "invalid choice"),
    ([], "attacks = {kinds = ['image']}\n", "unknown protect.attacks setting(s): kinds"),
    ([], "stage1_steps = 0\n", "stage1_steps must be at least 1"),
    ([], "[attacks]\nlr_range = [1e-3, 1e-5]\n", "attacks.lr_range"),
    ([], 'stage1_steps = "many"\n', "protect.stage1_steps must be an integer, got 'many'"),
    ([], "[attacks]\noptimizers = [['adam', 'much']]\n",
     "protect.attacks.optimizers must be a list, each a list [a string, a finite number]"),
    (["--parts", "decoder,vae"], None, "--parts must be a comma-separated subset of decoder,unet"),
    ([], 'parts = ["text_encoder"]\n', "parts must be one or more of decoder, unet"),
    ([], '[unet]\ntarget = "white"\n', "unet.target must be one of black, esd"),
])
def test_protect_settings_are_checked_before_any_work(tmp_path, args, config, needle):
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        args = args + ["--config", str(tmp_path / "c.toml")]
    r = run_cli("protect", "patronus-tiny", "--out", str(tmp_path / "o"), *args)
    if needle == "invalid choice":  # argparse's own message, also exit code 2
        assert r.returncode == 2 and needle in r.stderr
    else:
        assert_clean_error(r, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--steps", "-3", "--n and --steps must be at least 1"),
    ("--n", "0", "--n and --steps must be at least 1"),
    ("--guidance", "-1", "--guidance must be a finite number >= 0"),
])
def test_generate_refuses_bad_numbers_before_loading_anything(tmp_path, flag, value, needle):
    assert_clean_error(run_cli("generate", "patronus-tiny", "x", flag, value, "--out", str(tmp_path / "o")), needle)
    assert not (tmp_path / "o").exists()


def test_a_pickle_weight_file_is_refused_unless_allowed(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY_DIR, model)
    from safetensors.torch import load_file

    state = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    torch.save(state, model / "vae" / "diffusion_pytorch_model.bin")
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    r = run_cli("generate", str(model), "a red star", "--n", "1", "--steps", "2", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "holds pickle weight files (vae/diffusion_pytorch_model.bin)")
    assert not (tmp_path / "o").exists()
    r = run_cli("--allow-pickle", "generate", str(model), "a red star", "--n", "1", "--steps", "2",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "grid.png").exists()
