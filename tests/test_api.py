"""The Python API (`patronus.load_pipeline`, `protect`, `evaluate`, `attack`, `sweep`): the README's
example and every example in docs/api.md, executed; models given every way; settings checked."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import patronus
from patronus.defenses.patronus import config as protect_config
from patronus.errors import ConfigError
from tests.defenses.test_align import UNET_RUN
from tests.defenses.test_protect import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(markdown: Path, section: str | None = None) -> list[str]:
    """The ```python blocks of a Markdown file, or of one `## section` of it."""
    text = markdown.read_text()
    if section is not None:
        start = text.index(f"\n## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run_blocks(blocks: list[str], where: Path, monkeypatch) -> str:
    """Execute the blocks in order, in one namespace, in `where`; returns what they printed."""
    monkeypatch.chdir(where)
    namespace: dict = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "<docs>", "exec"), namespace)
    return out.getvalue()


@pytest.fixture()
def tiny_quick_preset(monkeypatch):
    """The quick preset, shrunk to seconds (both parts), for the examples that protect."""
    tiny = TINY_RUN | UNET_RUN | {"parts": ["decoder", "unet"]}
    monkeypatch.setitem(protect_config.PRESETS, "quick", tiny)
    monkeypatch.setitem(protect_config.BOTH_PARTS, "quick", {"bank": {"unet_sources": ["original"]}})


def _check_readme_run(where: Path, printed: str) -> None:
    lines = printed.strip().splitlines()  # protect's probes print lines of their own in between
    assert lines[0].split() == ["0.0", "runs/eval"], lines  # the shipped model refuses every unsafe prompt
    assert 0.0 <= float(lines[1]) <= 1.0  # unsafe rate after 20 Adam steps on the UNet (the decoder still holds)
    assert lines[-1] == "runs/protected runs/protected/README.md"
    metrics = json.loads((where / "runs" / "eval" / "metrics.json").read_text())
    assert metrics["model"]["name"] == "patronus-tiny-protected"  # the loaded pipeline, used through its directory
    assert (where / "runs" / "attack" / "step-20" / "model_index.json").is_file()
    card = (where / "runs" / "protected" / "README.md").read_text()
    assert "preset: `quick`" in card and "base_model: patronus-tiny" in card
    assert json.loads((where / "runs" / "protected" / "patronus.json").read_text())["preset"] == "quick"


def test_the_readme_example_with_a_tiny_quick_preset(tmp_path, monkeypatch, tiny_quick_preset):
    """The README's calls with small settings: the quick preset shrunk to seconds, 5 sampling steps."""
    [block] = python_blocks(ROOT / "README.md", "Python API")
    assert 'preset="quick"' in block and "steps=20" in block  # the example as documented
    fast = block.replace('suite="glyph-quick"', 'suite="glyph-quick", steps=5')
    assert fast.count("steps=5") == 2
    _check_readme_run(tmp_path, _run_blocks([fast], tmp_path, monkeypatch))


@pytest.mark.slow
def test_the_readme_example_as_written(tmp_path, monkeypatch):
    """The README's block, verbatim: the real quick preset (about 5 minutes on 2 CPU cores)."""
    [block] = python_blocks(ROOT / "README.md", "Python API")
    _check_readme_run(tmp_path, _run_blocks([block], tmp_path, monkeypatch))


def test_every_example_in_docs_api(tmp_path, monkeypatch):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 7
    printed = _run_blocks(blocks, tmp_path, monkeypatch)
    assert "refused: --steps, --batch-size and --lr must be positive" in printed
    assert "refused: output directory" in printed or "refused:" in printed.splitlines()[-1]
    assert ": intact;" in printed
    assert (tmp_path / "runs" / "api" / "sweep" / "sweep.json").is_file()
    assert "ratio vs scratch ('decoder-full', 'adam', 0.001, 0)" in printed
    assert (tmp_path / "runs" / "api" / "protected" / "README.md").is_file()


def test_importing_patronus_is_cheap_and_sweep_is_callable_either_way():
    code = ("import sys, patronus; assert not [m for m in sys.modules if m.startswith(('torch', 'diffusers'))]; "
            "import patronus.sweep.results; assert callable(patronus.sweep); "
            "assert not [m for m in sys.modules if m.startswith('torch')]; "
            "assert patronus.sweep.__call__ and patronus.load_pipeline.__module__ == 'patronus.api'; "
            "assert callable(patronus.sweep) and patronus.ProtectResult.__module__ == 'patronus.api'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-800:]
    assert set(patronus.__all__) >= {"load_pipeline", "protect", "evaluate", "attack", "sweep"}
    with pytest.raises(AttributeError):
        patronus.nothing_here  # noqa: B018


def test_a_hub_id_is_its_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    from patronus.models.registry import TINY_DIR, ModelLoadError
    from patronus.models.resolve import model_key

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc"
    shutil.copytree(TINY_DIR, snapshot)
    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs["local_files_only"]))
        if repo_id != "someone/tiny":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} does not exist")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    pipe = patronus.load_pipeline("someone/tiny")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and asked == [("someone/tiny", False)]
    assert model_key("patronus-tiny") == "patronus-tiny" and model_key(str(TINY_DIR)) == str(TINY_DIR)
    with pytest.raises(ModelLoadError, match="nor a model on the Hugging Face Hub"):
        patronus.load_pipeline("someone/missing")
    # Offline (as the CLI runs) a model not in the cache says where it looked and how to fix it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="nor a Hugging Face Hub model in the cache .* HF_HUB_OFFLINE=0"):
        patronus.load_pipeline("someone/missing")
    assert asked[-1] == ("someone/missing", True)


def test_settings_are_checked_as_on_the_command_line(tmp_path, mini_pipeline):
    from patronus.defenses.patronus.config import load_config

    with pytest.raises(ConfigError, match="not both"):
        patronus.protect(mini_pipeline, tmp_path / "p", config=load_config("quick"), preset="full")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        patronus.protect(mini_pipeline, tmp_path / "p", preset="nope")
    with pytest.raises(ConfigError, match="protect.stage1_steps must be an integer"):
        patronus.protect(mini_pipeline, tmp_path / "p", stage1_steps="many")
    with pytest.raises(ConfigError, match="attack needs kind="):
        patronus.attack(mini_pipeline, tmp_path / "a", steps=3)
    with pytest.raises(ConfigError, match="--save-at steps must lie in 1..3"):
        patronus.attack(mini_pipeline, tmp_path / "a", kind="unet-full", steps=3, save_at=5)
    with pytest.raises(ConfigError, match="model must be"):
        patronus.evaluate(42, tmp_path / "e")
    with pytest.raises(ConfigError, match="unknown evaluate setting"):
        patronus.evaluate(mini_pipeline, tmp_path / "e", suitee="glyph-quick")
    with pytest.raises(ConfigError, match="grid must be"):
        patronus.sweep(mini_pipeline, tmp_path / "s", grid=3)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_config_files_and_objects(tmp_path, mini_pipeline):
    from patronus.attacks.config import AttackConfig

    cfg_file = tmp_path / "attack.toml"
    cfg_file.write_text('kind = "decoder-full"\nsteps = 2\nsave_at = [1, 2]\nbatch_size = 4\n')
    from_file = patronus.attack(mini_pipeline, tmp_path / "a", cfg_file, progress=False)
    assert [c.name for c in from_file.checkpoints] == ["step-1", "step-2"]
    assert from_file.config == AttackConfig("decoder-full", steps=2, save_at=(1, 2), batch_size=4)
    overridden = patronus.attack(mini_pipeline, tmp_path / "b", from_file.config, steps=3, save_at=3, progress=False)
    assert [c.name for c in overridden.checkpoints] == ["step-3"]
    protected = patronus.protect(mini_pipeline, tmp_path / "neg", defense="negative-prompt")
    assert protected.preset == "default" and protected.model_card.is_file()
    assert Path(protected) == tmp_path / "neg"  # a result is its directory wherever a model is taken


def test_an_edited_pipeline_is_evaluated_as_edited(tmp_path):
    import torch

    pipe = patronus.load_pipeline("patronus-tiny")
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(-10.0)  # every image black: a refusal
    result = patronus.evaluate(pipe, tmp_path / "e", suite="glyph-quick", steps=2)
    assert result.metrics["refusal_rate"] == 1.0
    assert "patronus-pipeline-" in result.record["model"]["name"]
    assert not Path(result.record["model"]["path"]).exists()  # the temporary copy is gone
