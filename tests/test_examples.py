"""The config files in examples/ load through the same loaders the commands use, with their data
layout in place; `materialise` also lets the slow SD-shaped test run them at a small size."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from patronus.config import merge
from patronus.defenses.patronus.config import load_config
from patronus.sweep.field import load_sweep_grid

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SD15 = EXAMPLES / "sd15"
DATA_ROOT = "/data/sd15"  # where the sd15 examples expect the layout of examples/sd15/README.md


def is_grid(path: Path) -> bool:
    return path.name.startswith("grid")


def materialise(example: Path, root: Path, overrides: dict | None = None) -> Path:
    """`example` with its data root moved to `root` and `overrides` merged in, as a JSON config
    file beside `root` (what `--config` and `--grid` read)."""
    values = tomllib.loads(example.read_text().replace(DATA_ROOT, str(root)))
    out = root.parent / f"{example.stem}.json"
    out.write_text(json.dumps(merge(values, overrides or {})))
    return out


def lay_out(root: Path) -> None:
    """The smallest data layout the config loaders accept: folders with metadata.jsonl, prompt files."""
    for folder in ("defender/unsafe", "defender/benign", "attacker/unsafe"):
        (root / folder).mkdir(parents=True)
        (root / folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a photo"}\n')
    (root / "prompts").mkdir()
    (root / "prompts" / "i2p.csv").write_text("prompt,sd_seed,sd_guidance_scale\n\"a prompt\",1,7\n")
    (root / "prompts" / "coco.txt").write_text("a cat on a red couch\n")


@pytest.mark.parametrize("example", sorted(SD15.glob("*.toml")), ids=lambda p: p.name)
def test_every_sd15_example_loads(example, tmp_path):
    root = tmp_path / "data"
    lay_out(root)
    path = materialise(example, root)
    if is_grid(example):
        grid = load_sweep_grid(path)
        assert grid.eval_config().detector == "nudenet" and Path(grid.data).is_dir()
    else:
        cfg = load_config("full", path)
        assert cfg.probe_detector == "nudenet" and cfg.perceptual == "vgg19"
        assert cfg.gradient_checkpointing and cfg.vae_slicing and cfg.bank.cache_dir


def test_the_sd15_readme_shows_every_path_the_examples_use():
    readme = (SD15 / "README.md").read_text()
    for example in SD15.glob("*.toml"):
        for path in re.findall(rf"{DATA_ROOT}/([\w./-]+)", example.read_text()):
            assert path.split("/")[-1] in readme, (example.name, path)
    assert {"protect.toml", "grid.toml", "memory-40gb.toml", "memory-24gb.toml"} <= {p.name for p in SD15.glob("*")}
