"""The field grid on a miniature pipeline: defences built, every cell run, resumed, reported."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from patronus.errors import ConfigError
from patronus.provenance import weight_hashes
from patronus.report import build_report
from patronus.sweep.field import build_defences, field_grid_from_dict, load_sweep_grid, run_field
from patronus.sweep.grid import GridConfig
from patronus.sweep.layout import SweepError, SweepLayout

GRID = {
    "defences": ["none", "checker", "patronus-decoder", "patronus"],
    "suite": "glyph-quick",
    "batch_size": 2,
    "eval": {"steps": 2},
    "attacks": [{"kind": "none"}, {"kind": "remove-filter"}, {"kind": "unet-full", "steps": 2},
                {"kind": "textual-inversion", "lr": 1e-2, "steps": 2}, {"kind": "swap-decoder"}],
}


def test_field_grid_runs_every_cell_resumes_and_reports(mini_pipeline, tmp_path, capsys):
    grid = field_grid_from_dict(GRID, "test")
    out = tmp_path / "field"
    summary = run_field(str(mini_pipeline), grid, out, unprotected=str(mini_pipeline))
    cells = {(c["model"], c["cell"]["kind"]) for c in summary["cells"]}
    rows = ["none", "checker", "patronus-decoder", "patronus"]
    assert cells == {(r, a["kind"]) for r in rows for a in GRID["attacks"]} | {("scratch", "unet-full")}
    assert (out / "defences" / "checker" / "safety_checker").is_dir()
    none = next(c for c in summary["cells"] if c["model"] == "checker" and c["cell"]["kind"] == "none")
    assert "psnr_vs_reference" in none["results"]["0"]  # the benign-quality column
    first = json.loads((out / "sweep.json").read_text())["cells"]
    capsys.readouterr()
    run_field(str(mini_pipeline), grid, out, unprotected=str(mini_pipeline))  # resume: nothing left to run
    assert "21 cells done, 0 to run" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["cells"] == first
    with pytest.raises(SweepError, match="another grid"):
        run_field(str(mini_pipeline), field_grid_from_dict(GRID | {"suite": "glyph"}, "t"), out,
                  unprotected=str(mini_pipeline))
    md = (build_report([out], tmp_path / "report").parent / "report.md").read_text()
    assert "Field table 1" in md and "| safety checker |" in md and "textual-inversion" in md
    assert "n/a (scratch: weight attacks only)" in md
    assert (tmp_path / "report" / "field-1.png").exists()


def test_the_filtered_row_has_no_swap_cell(mini_pipeline, tmp_path):
    """swap-decoder puts the unprotected model's VAE back; the filtered model never had it (its own
    VAE is its original), so its row has no such cell and the table says why."""
    grid = field_grid_from_dict(GRID | {"defences": ["none"], "filtered": True,
                                        "attacks": [{"kind": "none"}, {"kind": "swap-decoder"}]}, "test")
    out = tmp_path / "field"
    summary = run_field(str(mini_pipeline), grid, out, unprotected=str(mini_pipeline), filtered=str(mini_pipeline))
    assert {(c["model"], c["cell"]["kind"]) for c in summary["cells"]} == {
        ("none", "none"), ("none", "swap-decoder"), ("filtered", "none")}
    md = (build_report([out], tmp_path / "report").parent / "report.md").read_text()
    assert "n/a (its own VAE is the original)" in md


def test_the_half_rows_put_the_other_part_of_the_unprotected_model_back(mini_pipeline, tmp_path):
    protected = tmp_path / "protected"
    shutil.copytree(mini_pipeline, protected)
    for part in ("unet", "vae"):  # a "two-part" model: both weight files differ from the base's
        f = next((protected / part).glob("*.safetensors"))
        save_file({k: v + 1 for k, v in load_file(f).items()}, f)
    grid = field_grid_from_dict(GRID | {"defences": ["patronus-decoder", "patronus-unet"]}, "test")
    paths = build_defences(grid, str(protected), str(mini_pipeline), SweepLayout(tmp_path / "field"))
    base, mine = weight_hashes(mini_pipeline), weight_hashes(protected)
    for row, kept, put_back in (("patronus-decoder", "vae", "unet"), ("patronus-unet", "unet", "vae")):
        got, info = weight_hashes(paths[row]), json.loads((Path(paths[row]) / "patronus.json").read_text())
        assert all(got[k] == mine[k] != base[k] for k in got if k.startswith(kept + "/"))
        assert all(got[k] == base[k] for k in got if k.startswith(put_back + "/"))
        assert info["changed_weight_files"] == sorted(k for k in got if k.startswith(kept + "/"))


def test_field_grid_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown defence"):
        field_grid_from_dict(GRID | {"defences": ["none", "bogus"]}, "g")
    with pytest.raises(ConfigError, match="the same attack twice"):
        field_grid_from_dict(GRID | {"attacks": [{"kind": "none"}, {"kind": "none"}]}, "g")
    with pytest.raises(ConfigError, match="unknown preset"):
        field_grid_from_dict(GRID | {"presets": {"sld": "huge"}}, "g")
    with pytest.raises(ConfigError, match="unknown attack setting"):
        field_grid_from_dict(GRID | {"attacks": [{"kind": "none", "lrr": 1}]}, "g")


def test_shipped_grids_load_as_their_kind():
    assert len(load_sweep_grid("field").attacks) == 10
    assert load_sweep_grid("field").defences[-1] == "patronus"
    assert isinstance(load_sweep_grid("quick"), GridConfig)


def test_field_attacks_take_a_schedule_and_a_frozen_text_encoder():
    from patronus.sweep.layout import cell_id

    attacks = [{"kind": "joint", "steps": 4}, {"kind": "joint", "steps": 4, "freeze_text_encoder": True},
               {"kind": "unet-full", "optimizer": "sgd", "steps": 4, "schedule": "step"}]
    grid = field_grid_from_dict(GRID | {"attacks": attacks}, "g")
    assert [cell_id(a.cell(0)) for a in grid.attacks] == ["joint_adam_lr0.0001_s0", "joint-frozen-te_adam_lr0.0001_s0",
                                                          "unet-full_sgd_lr0.0001_step_s0"]
    configs = [a.config(grid, "patronus-tiny") for a in grid.attacks]
    assert [(c.schedule, c.freeze_text_encoder) for c in configs] == [("constant", False), ("constant", True),
                                                                      ("step", False)]
    with pytest.raises(ConfigError, match="--freeze-text-encoder applies to"):
        field_grid_from_dict(GRID | {"attacks": [{"kind": "unet-full", "freeze_text_encoder": True}]}, "g")
    with pytest.raises(ConfigError, match="trains nothing: a learning-rate schedule does not apply"):
        field_grid_from_dict(GRID | {"attacks": [{"kind": "remove-filter", "schedule": "step"}]}, "g")


def test_a_field_sweep_started_before_schedules_existed_resumes(tmp_path):
    from patronus.config import to_dict
    from patronus.sweep.field import _check_same_field

    grid = field_grid_from_dict(GRID, "g")
    layout = SweepLayout(tmp_path / "field")
    layout.root.mkdir()
    old = {"field": True} | to_dict(grid)
    old["attacks"] = [{k: v for k, v in a.items() if k not in ("schedule", "freeze_text_encoder", "max_grad_norm")}
                      for a in old["attacks"]]
    layout.grid_file.write_text(json.dumps(old))
    _check_same_field(layout, grid, {"protected": "p"})
    stepped = GRID | {"attacks": GRID["attacks"][:2] + [{"kind": "unet-full", "steps": 2, "schedule": "step"}]
                      + GRID["attacks"][3:]}
    layout.grid_file.write_text(json.dumps(old))
    with pytest.raises(SweepError, match="another grid"):
        _check_same_field(layout, field_grid_from_dict(stepped, "g"), {"protected": "p"})


def test_a_clipped_attack_is_its_own_column():
    from patronus.report import field_column
    from patronus.sweep.field import FieldAttack, FieldGridConfig

    clipped = FieldAttack(kind="joint", lr=1e-3, max_grad_norm=1.0)
    grid = FieldGridConfig(attacks=(clipped, FieldAttack(kind="joint", lr=1e-3)), defences=("none",))
    assert clipped.config(grid, "patronus-tiny").max_grad_norm == 1.0
    assert field_column(clipped.cell(0)) == "joint (gradient clipped to 1)"
    with pytest.raises(ConfigError, match="none fine-tunes no weights"):
        FieldGridConfig(attacks=(FieldAttack(kind="none", max_grad_norm=1.0),), defences=("none",))
