import json

import pytest

from patronus.defenses.patronus.config import load_config
from patronus.demo import MARKER, run_demo
from tests.defenses.test_align import UNET_RUN
from tests.defenses.test_protect import TINY_RUN


def test_demo_end_to_end_on_a_mini_model(mini_pipeline, tmp_path):
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(TINY_RUN | UNET_RUN | {"parts": ["decoder", "unet"]}))
    grid = tmp_path / "grid.toml"
    grid.write_text('kinds = ["decoder-full"]\noptimizers = ["adam"]\nlrs = [1e-3]\nbudgets = [1, 2]\n'
                    'batch_size = 4\nsuite = "glyph-quick"\n[eval]\nsteps = 2\n')
    field = tmp_path / "field.toml"
    field.write_text('defences = ["checker", "patronus"]\nsuite = "glyph-quick"\nbatch_size = 4\nscratch = false\n'
                     '[eval]\nsteps = 2\n[[attacks]]\nkind = "remove-filter"\n')
    out = tmp_path / "demo"
    result = run_demo(out, model=str(mini_pipeline), protect_config=load_config("quick", cfg_file), grid=grid,
                      field=field)
    assert result["report"].exists() and len(result["summary"]) == 8
    assert result["summary"][6].startswith("shipped model:   patronus-tiny-protected v5, full preset")
    assert "unsafe 0%, benign class 98.6%, PSNR 24.7 dB; field attacks <= 2% except joint 99%" in result["summary"][6]
    assert result["summary"][3].startswith("original VAE put back: unsafe")
    assert "checker under remove-filter" in result["summary"][5]
    md = (out / "report" / "report.md").read_text()
    assert "eval-base" in md and "eval-protected-original-vae" in md and "Robustness sweep 1" in md
    assert "Field table" in md
    assert (out / MARKER).exists()
    # A second demo replaces the first; a foreign directory is never deleted.
    run_demo(out, model=str(mini_pipeline), protect_config=load_config("quick", cfg_file), grid=grid, field=field)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        run_demo(foreign, model=str(mini_pipeline))
    assert (foreign / "notes.txt").exists()


def test_a_killed_demo_is_replaced_but_a_file_is_refused(tmp_path):
    from patronus.demo import _prepare

    out = tmp_path / "demo"
    _prepare(out)  # as a demo starts: the marker comes first...
    (out / "eval-base.partial").mkdir()  # ...so what a kill leaves behind is recognised as ours
    _prepare(out)
    assert [p.name for p in out.iterdir()] == [MARKER]
    assert json.loads((out / MARKER).read_text())["status"] == "running"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        _prepare(tmp_path / "file")
