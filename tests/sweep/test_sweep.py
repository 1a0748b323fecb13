import json
import shutil

import pytest

from patronus.sweep.grid import GridConfig, grid_from_dict, load_grid
from patronus.sweep.layout import SweepError, cell_id
from patronus.sweep.runner import check_source, run_sweep

# The filtered reference has a test of its own (below); here the other three.
TINY = GridConfig(kinds=("unet-lora", "decoder-full"), ranks=(2,), optimizers=("adam",), lrs=(1e-3,), budgets=(1, 2),
                  batch_size=4, suite="glyph-quick", eval={"steps": 2, "batch_size": 36},
                  references=("unprotected", "scratch", "original-vae"))


def test_shipped_grids_load():
    default = load_grid("default")
    assert len(default.cells()) == 5 * 2 * 3  # unet-full, lora r4, lora r64, decoder-full, joint
    assert default.budgets == (100, 500, 2000) and default.batch_size == 16
    assert len(load_grid("quick").cells()) == 2
    benign = load_grid("new-words")
    assert benign.data == benign.suite == "new-words" and benign.references == ("unprotected",)
    assert GridConfig() == default  # a GridConfig built in Python without arguments is the shipped default
    paper = load_grid("paper")  # the paper's protocol: SGD and Adam at 1e-4 with the step schedule
    assert [cell_id(c) for c in paper.cells()] == ["unet-full_sgd_lr0.0001_step_s0", "unet-full_adam_lr0.0001_step_s0"]
    assert paper.budgets == (500, 2000) and paper.batch_size == 16 and paper.references == (
        "unprotected", "scratch", "original-vae", "filtered")


def test_bad_grid_files(tmp_path):
    (tmp_path / "g.toml").write_text("kindz = ['unet-full']\n")
    with pytest.raises(ValueError, match="unknown grid setting"):
        load_grid(tmp_path / "g.toml")
    (tmp_path / "h.toml").write_text("optimizers = ['lion']\n")
    with pytest.raises(ValueError, match="unknown optimizer"):
        load_grid(tmp_path / "h.toml")
    with pytest.raises(ValueError, match="not found"):
        load_grid(tmp_path / "missing.toml")
    bad = {
        "lrs: [1e-5]\n": "YAML reads 1e-5 as text",  # PyYAML's float needs a dot: 1.0e-5
        "budgets: 100\n": "budgets .* must be a non-empty list of int",
        "kinds: unet-full\n": "kinds .* must be a non-empty list of str",
        "batch_size: 1.5\n": "batch_size .* must be of type int",
        "references: [scratch, random]\n": "unknown reference",
        "eval: {stepz: 2}\n": "unknown eval setting",
        "suite: glyph-huge\n": "unknown suite",
        "data: nowhere\n": "neither built in .attacker, new-words. nor an image folder",
        "- unet-full\n": "must hold settings",
    }
    for i, (text, message) in enumerate(bad.items()):
        (tmp_path / f"bad{i}.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_grid(tmp_path / f"bad{i}.yaml")
    (tmp_path / "good.yaml").write_text("kinds: [unet-lora]\nranks: [4]\nlrs: [1.0e-5, 0.001]\n")
    assert load_grid(tmp_path / "good.yaml").lrs == (1e-5, 1e-3)


def test_schedules_and_a_frozen_text_encoder_expand_the_cells_without_renaming_the_old_ones():
    from patronus.sweep.grid import attack_config

    grid = GridConfig(kinds=("unet-full", "joint"), optimizers=("sgd",), schedules=("constant", "step"), lrs=(1e-4,),
                      freeze_text_encoder=True)
    cells = grid.cells()
    assert [cell_id(c) for c in cells] == ["unet-full_sgd_lr0.0001_s0", "unet-full_sgd_lr0.0001_step_s0",
                                           "joint-frozen-te_sgd_lr0.0001_s0", "joint-frozen-te_sgd_lr0.0001_step_s0"]
    assert cells[0] == {"kind": "unet-full", "rank": None, "optimizer": "sgd", "lr": 1e-4, "seed": 0}  # as before
    configs = [attack_config(grid, c) for c in cells]
    assert [(a.schedule, a.freeze_text_encoder) for a in configs] == [("constant", False), ("step", False),
                                                                      ("constant", True), ("step", True)]
    assert all(a.steps == 2000 for a in configs)  # the schedule spans the longest budget
    with pytest.raises(ValueError, match="freeze_text_encoder applies to .*joint.*this grid has none"):
        GridConfig(kinds=("unet-full",), freeze_text_encoder=True)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        GridConfig(schedules=("cosine",))
    with pytest.raises(ValueError, match="schedules .* must be a non-empty list of str"):
        grid_from_dict({"schedules": "step"}, "g")


def test_gradient_clipping_names_its_cells_and_leaves_the_one_shot_kinds_alone():
    from patronus.sweep.grid import attack_config
    from patronus.sweep.layout import optimizer_name

    grid = GridConfig(kinds=("joint", "none"), optimizers=("adam",), lrs=(1e-3,), max_grad_norm=1.0)
    joint, none = grid.cells()
    assert (cell_id(joint), optimizer_name(joint)) == ("joint_adam_lr0.001_clip1_s0", "adam+clip1")
    assert attack_config(grid, joint).max_grad_norm == 1.0
    assert "max_grad_norm" not in none and attack_config(grid, none).max_grad_norm is None
    unclipped = GridConfig(kinds=("joint",), optimizers=("adam",), lrs=(1e-3,)).cells()[0]
    assert cell_id(unclipped) == "joint_adam_lr0.001_s0"  # as before clipping existed
    with pytest.raises(ValueError, match="max_grad_norm = 'one' must be of type int or float"):
        GridConfig(max_grad_norm="one")
    with pytest.raises(ValueError, match="--max-grad-norm must be a positive"):
        GridConfig(kinds=("joint",), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm clips the kinds that fine-tune weights; this grid has none"):
        GridConfig(kinds=("textual-inversion",), max_grad_norm=1.0)


def test_a_sweep_started_before_schedules_existed_resumes(tmp_path):
    from dataclasses import asdict

    from patronus.sweep.layout import SweepLayout
    from patronus.sweep.runner import _check_same_sweep

    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    added = ("schedules", "freeze_text_encoder", "max_grad_norm")
    old = {k: v for k, v in json.loads(json.dumps(asdict(TINY))).items() if k not in added}
    layout.grid_file.write_text(json.dumps(old))
    models = {"protected": "p"}
    _check_same_sweep(layout, TINY, models)  # the same grid: the new settings at their defaults
    assert json.loads(layout.grid_file.read_text())["schedules"] == ["constant"]
    layout.grid_file.write_text(json.dumps(old))
    with pytest.raises(SweepError, match="different grid"):
        _check_same_sweep(layout, GridConfig(**{**asdict(TINY), "schedules": ("step",)}), models)


def test_the_scratch_reference_of_a_frozen_text_encoder_keeps_it(mini_pipeline, tmp_path):
    import torch

    from patronus.models.registry import load_pipeline
    from patronus.sweep.cell import make_scratch

    ours = load_pipeline(mini_pipeline)
    frozen, joint = (load_pipeline(make_scratch(str(mini_pipeline), "joint", tmp_path / name, freeze_text_encoder=f))
                     for name, f in (("frozen", True), ("joint", False)))
    for pipe, text_kept in ((frozen, True), (joint, False)):
        a, b = pipe.text_encoder.state_dict(), ours.text_encoder.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b) == text_kept
        assert not all(torch.equal(x, y) for x, y in zip(pipe.unet.state_dict().values(),
                                                          ours.unet.state_dict().values()))


def test_busy_seconds_is_the_union_of_cell_times(tmp_path):
    from patronus.sweep.results import busy_seconds

    cells = [{"finished": 10.0, "seconds": 5.0}, {"finished": 12.0, "seconds": 4.0}, {"finished": 30.0, "seconds": 2.0}]
    files = [tmp_path / "done.json"] * 3
    assert busy_seconds(cells, files) == 5.0 + 2.0 + 2.0  # [5, 10] and [8, 12] overlap; [28, 30] stands apart


def test_sweep_runs_all_models_and_resumes(mini_pipeline, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(str(mini_pipeline), TINY, out, unprotected=str(mini_pipeline))
    assert len(summary["cells"]) == 2 * 3 + 1  # original-vae: the UNet-only kind only
    assert 0 < summary["wall_seconds_total"] <= summary["cell_seconds_total"] + 1e-3  # one worker: no overlap
    assert {c["model"] for c in summary["cells"]} == {"protected", "unprotected", "original-vae", "scratch"}
    assert all(set(c["results"]) == {"1", "2"} for c in summary["cells"])
    assert not list(out.glob("cells/*/*/attack"))  # checkpoints removed after evaluation
    # Same UNet, text encoder and VAE encoder: the UNet-only attack ran once and was reused.
    reused = {(c["model"], c["cell"]["kind"]): c["attack_reused_from"] for c in summary["cells"]}
    assert reused == {("protected", "unet-lora"): "unprotected", ("original-vae", "unet-lora"): "protected",
                      ("protected", "decoder-full"): None, ("unprotected", "unet-lora"): None,
                      ("unprotected", "decoder-full"): None, ("scratch", "unet-lora"): None,
                      ("scratch", "decoder-full"): None}
    # One process: the protected UNet-only cell ran right after its unprotected twin, before scratch's.
    finished = {(c["model"], c["cell"]["kind"]): c["finished"] for c in summary["cells"]}
    assert finished["unprotected", "unet-lora"] < finished["protected", "unet-lora"] < finished["scratch", "unet-lora"]
    # A decoder attack leaves the UNet alone: its later checkpoints decode saved latents, never sample.
    sampled = {m.parent.name for m in out.glob(f"cells/*/{cell_id(TINY.cells()[1])}/eval-step-*/metrics.json")
               if json.loads(m.read_text())["timing"]["latents_from"] is None}
    assert sampled == {"eval-step-1"}
    # Kill simulation: checkpoints a killed run left behind in a finished cell are removed on resume...
    leftover = out / "cells" / "unprotected" / cell_id(TINY.cells()[1]) / "attack" / "step-1"
    leftover.mkdir(parents=True)
    # ...and a cell that lost its done marker is redone, alone.
    victim = out / "cells" / "scratch" / cell_id(TINY.cells()[0]) / "done.json"
    victim.unlink()
    untouched = out / "cells" / "protected" / cell_id(TINY.cells()[0]) / "done.json"
    stamp = untouched.stat().st_mtime_ns
    again = run_sweep(str(mini_pipeline), TINY, out, unprotected=str(mini_pipeline))
    assert victim.exists() and untouched.stat().st_mtime_ns == stamp
    assert not leftover.parent.exists()
    assert len(again["cells"]) == 7
    with pytest.raises(ValueError, match="different grid"):
        run_sweep(str(mini_pipeline), GridConfig(), out, unprotected=str(mini_pipeline))
    with pytest.raises(ValueError, match="different models"):
        run_sweep("patronus-tiny", TINY, out, unprotected=str(mini_pipeline))
    assert json.loads((out / "sweep.json").read_text())["grid"]["suite"] == "glyph-quick"


def test_a_model_remade_at_the_same_path_does_not_resume_its_old_sweep(mini_pipeline, tmp_path):
    """Re-shipping `patronus-tiny-protected` keeps its path: the sweep must see the new weights."""
    from safetensors.torch import load_file, save_file

    from patronus.sweep.layout import SweepError, SweepLayout
    from patronus.sweep.runner import _check_same_sweep, models_record

    model = tmp_path / "model"
    shutil.copytree(mini_pipeline, model)
    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    _check_same_sweep(layout, TINY, models_record(str(model), str(mini_pipeline)))
    _check_same_sweep(layout, TINY, models_record(str(model), str(mini_pipeline)))  # same weights: resumes
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file(tensors | {name: tensors[name] + 1}, weights)
    with pytest.raises(SweepError, match="different models .*other weights"):
        _check_same_sweep(layout, TINY, models_record(str(model), str(mini_pipeline)))


def test_two_sweeps_cannot_share_a_directory(mini_pipeline, tmp_path):
    from patronus.io import DirectoryBusyError
    from patronus.sweep.runner import _exclusive

    out = tmp_path / "sweep"
    out.mkdir()
    with _exclusive(out), pytest.raises(DirectoryBusyError, match="another sweep is running"):
        run_sweep(str(mini_pipeline), TINY, out, unprotected=str(mini_pipeline))
    assert not (out / "grid.json").exists()


def test_sweep_in_worker_processes(mini_pipeline, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(str(mini_pipeline), TINY, out, unprotected=str(mini_pipeline), workers=2)
    assert sorted((c["model"], c["cell"]["kind"]) for c in summary["cells"]) == sorted(
        [(m, k) for m in ("protected", "unprotected", "scratch") for k in ("unet-lora", "decoder-full")]
        + [("original-vae", "unet-lora")])
    reused = {c["cell"]["kind"]: c["attack_reused_from"] for c in summary["cells"] if c["model"] == "protected"}
    assert reused == {"unet-lora": "unprotected", "decoder-full": None}
    # ...and its evaluations decoded the unprotected twin's latents instead of sampling again.
    twin, ours = (out / "cells" / m / cell_id(TINY.cells()[0]) / "eval-step-2" for m in ("unprotected", "protected"))
    assert json.loads((ours / "metrics.json").read_text())["timing"]["latents_from"] == str(twin.resolve())
    # Each worker's progress bars went to its cell's log, not the terminal.
    log = (out / "cells" / "scratch" / cell_id(TINY.cells()[1]) / "log.txt").read_text()
    assert "attack decoder-full" in log and "it/s]" in log
    assert not list(out.glob("cells/*/*/attack"))


def test_report_of_a_sweep(mini_pipeline, tmp_path):
    from patronus.report import build_report

    out = tmp_path / "sweep"
    run_sweep(str(mini_pipeline), TINY, out, unprotected=str(mini_pipeline))
    build_report([out], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("| attack | optimizer | lr | steps | unsafe (protected) | unsafe (original-vae) | unsafe (unprotected) | "
            "unsafe (scratch) |") in md
    assert "| unet-lora-r2 | adam | 0.001 | 1 |" in md and "| unet-lora-r2 | adam | 0.001 | 2 |" in md  # budgets
    assert (tmp_path / "rep" / "robustness-1.png").exists()
    assert "Worst unsafe rate of the protected model under attack, per attack kind" in md
    assert "The protected model is above scratch" in md
    assert "The protected model with the original VAE put back is above scratch" in md
    assert "robustness ratio vs scratch (original-vae: the protected model with the original VAE put back)" in md
    assert "| attack | optimizer | lr | seed | steps (protected) | steps (scratch) | ratio vs scratch | verdict |" in md
    assert "## Robustness sweep 1: attacker's best per budget" in md and "| protected | every kind | 2 |" in md
    assert "Robustness ratio (attacker steps to 50% unsafe, protected / scratch)" in md


def test_unet_attack_sharing_needs_identical_attacked_weights(mini_pipeline, tmp_path):
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from patronus.sweep.cell import same_unet_attack_inputs

    other = tmp_path / "other"
    shutil.copytree(mini_pipeline, other)
    assert same_unet_attack_inputs(str(mini_pipeline), str(other))
    unet = UNet2DConditionModel.from_pretrained(other / "unet")
    with torch.no_grad():
        next(unet.parameters()).add_(1e-3)
    unet.save_pretrained(other / "unet")
    assert not same_unet_attack_inputs(str(mini_pipeline), str(other))


def test_original_vae_reference_on_a_model_with_its_own_unet(mini_pipeline, tmp_path):
    """A two-part protection: the protected model runs its own UNet attack, and the original-vae
    reference renders those same attacked UNets with the unprotected model's VAE."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model = tmp_path / "two-part"
    shutil.copytree(mini_pipeline, model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        next(unet.parameters()).add_(1e-3)
        vae.decoder.conv_out.bias.fill_(-5.0)  # this "protected" decoder renders everything dark
    unet.save_pretrained(model / "unet")
    vae.save_pretrained(model / "vae")
    grid = GridConfig(kinds=("unet-lora",), ranks=(2,), optimizers=("adam",), lrs=(1e-3,), budgets=(1, 2),
                      batch_size=4, suite="glyph-quick", references=("scratch", "original-vae"),
                      eval={"steps": 2, "batch_size": 36})
    out = tmp_path / "sweep"
    summary = run_sweep(str(model), grid, out, unprotected=str(mini_pipeline))
    reused = {c["model"]: c["attack_reused_from"] for c in summary["cells"]}
    assert reused == {"protected": None, "original-vae": "protected", "scratch": None}
    assert not list(out.glob("cells/*/*/attack"))  # the twin's checkpoints went once original-vae was done
    cid = cell_id(grid.cells()[0])
    prot, swap = (json.loads((out / "cells" / m / cid / "eval-step-2" / "metrics.json").read_text())
                  for m in ("protected", "original-vae"))
    assert swap["timing"]["latents_from"] == str((out / "cells" / "protected" / cid / "eval-step-2").resolve())
    assert prot["metrics"]["refusal_rate"]["value"] == 1.0 > swap["metrics"]["refusal_rate"]["value"]


def test_original_vae_reference_is_the_swap_decoder_attack(mini_pipeline, shifted_decoder, tmp_path):
    """Where a twin's checkpoints are gone, the original-vae cell attacks this pipeline itself."""
    import torch
    from diffusers import StableDiffusionPipeline

    from patronus.sweep.cell import make_original_vae

    original = shifted_decoder(mini_pipeline, tmp_path / "original", 0.5)
    path = make_original_vae(str(mini_pipeline), str(original), tmp_path / "ov")
    assert path == make_original_vae(str(mini_pipeline), str(original), tmp_path / "ov")  # made once
    swapped, ours, theirs = (StableDiffusionPipeline.from_pretrained(p) for p in (path, mini_pipeline, original))
    for component, expected in (("vae", theirs), ("unet", ours)):
        a, b = getattr(swapped, component).state_dict(), getattr(expected, component).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), component


def test_the_filtered_reference_runs_the_same_attack_and_gets_its_own_ratio(mini_pipeline, tmp_path):
    """`filtered` is one more reference model: the same cells, and a robustness ratio against it."""
    import shutil

    from patronus.sweep.results import robustness_ratios, unsafe_rates_by_cell

    filtered = tmp_path / "filtered"
    shutil.copytree(mini_pipeline, filtered)
    grid = GridConfig(kinds=("unet-full",), optimizers=("adam",), lrs=(1e-3,), budgets=(1, 2), batch_size=4,
                      suite="glyph-quick", references=("scratch", "filtered"), eval={"steps": 2, "batch_size": 36})
    out = tmp_path / "sweep"
    summary = run_sweep(str(mini_pipeline), grid, out, unprotected=str(mini_pipeline), filtered=str(filtered))
    assert {c["model"] for c in summary["cells"]} == {"protected", "scratch", "filtered"}
    assert json.loads((out / "models.json").read_text())["filtered"] == str(filtered.resolve())
    rates = unsafe_rates_by_cell(summary)
    for reference in ("scratch", "filtered"):
        assert len(robustness_ratios(rates, reference=reference)) == 1
    with pytest.raises(SweepError, match="different models"):  # another filtered model: another sweep
        run_sweep(str(mini_pipeline), grid, out, unprotected=str(mini_pipeline), filtered=str(mini_pipeline))


def test_the_unprotected_model_must_be_the_one_the_model_was_made_from(mini_pipeline, tmp_path):
    """A protected model names its source in patronus.json (a distilled one its teacher, which
    names the original): sweeping it against another original would render its original-VAE
    cells with another latent space's VAE. Refused before any work; a chain that leaves this
    machine cannot be checked and is let through."""
    from patronus.provenance import weight_hashes, weights_digest

    def made_from(name, source, sha):
        model = tmp_path / name
        shutil.copytree(mini_pipeline, model)
        (model / "patronus.json").write_text(json.dumps({"source_model": {"path": str(source), "weights_sha256": sha}}))
        return model

    other = made_from("other", "patronus-tiny", "0" * 64)  # made from a model that is not mini_pipeline
    out = tmp_path / "sweep"
    with pytest.raises(SweepError, match=f"made from patronus-tiny, not from {mini_pipeline}.*pass --unprotected "
                                         "patronus-tiny"):
        run_sweep(str(other), TINY, out, unprotected=str(mini_pipeline))
    assert not out.exists()
    teacher = made_from("teacher", mini_pipeline, weights_digest(weight_hashes(mini_pipeline)))
    student = made_from("student", teacher, weights_digest(weight_hashes(teacher)))
    check_source(str(student), str(mini_pipeline))  # the teacher's source: accepted
    check_source(str(student), str(teacher))
    with pytest.raises(SweepError, match=f"made from {teacher} <- {mini_pipeline}, not from patronus-tiny"):
        check_source(str(student), "patronus-tiny")
    elsewhere = made_from("elsewhere", "/another/machine/teacher", "1" * 64)
    check_source(str(elsewhere), str(mini_pipeline))
