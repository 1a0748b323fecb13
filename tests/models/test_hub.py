"""Hugging Face Hub ids (`org/name`) work wherever a model is taken, read from the Hub cache that
diffusers itself uses; offline and not cached, the command line says so in one line (exit 2)."""

import contextlib
import io
import shutil

import pytest
from diffusers import StableDiffusionPipeline

import patronus
from patronus.cli import main
from patronus.models.registry import PROTECTED_DIR, TINY_DIR, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repos: dict[str, object]):
    """A Hub cache laid out as huggingface_hub writes it: models--ORG--NAME/snapshots/COMMIT and
    refs/main naming that commit."""
    for repo_id, source in repos.items():
        repo = root / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / COMMIT)  # symlinked components copied as files
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return root


def test_a_hub_id_is_read_offline_from_the_hub_cache(tmp_path, monkeypatch):
    cache = hub_cache(tmp_path / "hub", {"someone/tiny": TINY_DIR, "someone/protected": PROTECTED_DIR})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = cache / "models--someone--tiny" / "snapshots" / COMMIT
    assert resolve_model("someone/tiny") == snapshot
    assert isinstance(patronus.load_pipeline("someone/tiny"), StableDiffusionPipeline)

    # The command line, with the cache given by --cache-dir instead of the environment.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["--cache-dir", str(cache), "generate", "someone/tiny", "a red star", "--n", "1", "--steps", "2",
              "--out", str(tmp_path / "gen")])
        main(["verify", "someone/protected"])
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert ": intact;" in out.getvalue()


def test_a_hub_id_that_is_not_cached_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "unused"))  # restored after --cache-dir sets it
    empty = tmp_path / "empty-cache"
    with pytest.raises(SystemExit) as exit_info:
        main(["--cache-dir", str(empty), "evaluate", "someone/missing", "--out", str(tmp_path / "eval")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "'someone/missing' not found" in lines[0] and str(empty) in lines[0]
    assert "HF_HUB_OFFLINE=0" in lines[0] and "--cache-dir" in lines[0]
    assert not (tmp_path / "eval").exists()
