import json
import shutil
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

from patronus.defenses.patronus.config import load_config
from patronus.defenses.patronus.protect import protect

TINY_RUN = {
    "parts": ["decoder"],
    "bank": {"n_train": 16, "n_query": 8, "n_probe": 8, "sampler_steps": 2},
    "batch_size": 8, "query_batch": 8, "stage1_steps": 4, "stage2_steps": 4, "probe_every": 2, "probe_steps": 2,
    "probe_batch": 4, "checkpoint_every": 2,
    "attacks": {"inner_steps": [1, 3], "batch_sizes": [2, 4], "queries_per_attack": 1},
}


@pytest.fixture()
def cfg(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_RUN))
    return load_config("quick", path)


def test_protect_writes_a_standard_pipeline_changing_only_the_decoder(mini_pipeline, tmp_path, cfg):
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert info["changed_weight_files"] == ["vae/diffusion_pytorch_model.safetensors"]
    saved = json.loads((tmp_path / "out" / "patronus.json").read_text())
    assert saved["parts"] == ["decoder"] and "unet" not in saved
    assert saved["decoder"]["chosen_checkpoint"]["step"] in (2, 4) and len(saved["decoder"]["probes"]) == 2
    assert {"total_seconds", "peak_memory_mb"} <= set(saved["timing"])
    assert {"total_seconds", "stage2_outer_step_seconds"} <= set(saved["decoder"]["timing"])
    original = StableDiffusionPipeline.from_pretrained(mini_pipeline)
    protected = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    for k, v in original.vae.encoder.state_dict().items():
        assert torch.equal(v, protected.vae.encoder.state_dict()[k])
    for k, v in original.unet.state_dict().items():
        assert torch.equal(v, protected.unet.state_dict()[k])
    assert any(not torch.equal(v, protected.vae.decoder.state_dict()[k])
               for k, v in original.vae.decoder.state_dict().items())
    stage1 = StableDiffusionPipeline.from_pretrained(tmp_path / "work" / "stage1-model")  # the ablation model
    assert json.loads((tmp_path / "work" / "stage1-model" / "patronus.json").read_text())["decoder"]["probes"] == []
    assert any(not torch.equal(v, protected.vae.decoder.state_dict()[k])
               for k, v in stage1.vae.decoder.state_dict().items())


def test_resume_gives_the_same_result(mini_pipeline, tmp_path, cfg):
    protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    # A run killed after its stage-2 step-2 checkpoint: keep only that checkpoint.
    protect(str(mini_pipeline), tmp_path / "b0", cfg, tmp_path / "wb")
    ckpts = sorted((tmp_path / "wb").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert ckpts[-1].name == "checkpoint-2000004"
    shutil.rmtree(ckpts[-1])
    assert json.loads((ckpts[-2] / "state.json").read_text())["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb")
    info = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    assert [pr["step"] for pr in info["decoder"]["probes"]] == [2, 4]  # step 4 was really run again
    a = StableDiffusionPipeline.from_pretrained(tmp_path / "a").vae.state_dict()
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "b").vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_resume_inside_stage_1_continues_the_lr_schedule_and_counts_every_session(mini_pipeline, tmp_path, cfg,
                                                                                  monkeypatch):
    from patronus.defenses.patronus.protect import Protector

    assert cfg.stage1_warmup > 2  # the schedule is still warming up where the run is killed
    protect(str(mini_pipeline), tmp_path / "a", cfg, tmp_path / "wa")
    calls = {"n": 0}
    original = Protector.terms

    def killed_at_step_3(self, g, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # stage-1 step 3, just after the step-2 checkpoint
            raise KeyboardInterrupt
        return original(self, g, **kwargs)

    monkeypatch.setattr(Protector, "terms", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb")
    assert [c.name for c in (tmp_path / "wb").glob("checkpoint-*")] == ["checkpoint-1000002"]
    assert not (tmp_path / "b").exists()
    # The killed session's cost (training and the set-up that built the cached feature bank), made
    # long enough that the resumed session's own seconds cannot hide it, counts after the resume.
    state_file = tmp_path / "wb" / "checkpoint-1000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["timing"]["setup_seconds"] > 0
    state_file.write_text(json.dumps(state | {"timing": state["timing"] | {"worked_seconds": 1000.0,
                                                                          "setup_seconds": 500.0}}))
    monkeypatch.setattr(Protector, "terms", original)
    info = protect(str(mini_pipeline), tmp_path / "b", cfg, tmp_path / "wb", resume=True)
    a = StableDiffusionPipeline.from_pretrained(tmp_path / "a").vae.state_dict()
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "b").vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info["decoder"]["timing"]["setup_seconds"] > 500.0
    assert info["timing"]["total_seconds"] > info["decoder"]["timing"]["total_seconds"] > 1500.0


def test_nft_weight_zero_is_the_same_run_without_simulated_attacks(mini_pipeline, tmp_path, cfg):
    import dataclasses

    info = protect(str(mini_pipeline), tmp_path / "out", dataclasses.replace(cfg, stage2_w_nft=0.0), tmp_path / "w")
    decoder = info["decoder"]
    assert decoder["timing"]["mean_inner_steps"] == 0 and [p["step"] for p in decoder["probes"]] == [2, 4]
    assert len(decoder["losses"]["stage2"]) == cfg.stage2_steps


def test_scrambling_pulls_unsafe_activations_to_fixed_targets_and_keeps_benign_ones(mini_pipeline, tmp_path, cfg):
    import dataclasses

    from accelerate import Accelerator

    from patronus.defenses.patronus.protect import Protector

    cfg = dataclasses.replace(cfg, stage1_w_scramble=1.0)
    p = Protector(str(mini_pipeline), cfg, tmp_path / "w", Accelerator())
    again = Protector(str(mini_pipeline), cfg, tmp_path / "w", Accelerator())
    assert all(torch.equal(a, b) for a, b in zip(p.scramble_targets, again.scramble_targets))  # seeded
    g = torch.Generator().manual_seed(0)
    terms = p.terms(g, scramble=True)
    assert "scramble" not in p.terms(torch.Generator().manual_seed(0))
    terms["scramble"].backward()
    assert p.head.decoder.mid_block.resnets[0].conv1.weight.grad.abs().sum() > 0
    assert p.head.decoder.conv_out.weight.grad is None  # after the last scrambled block: untouched
    assert all(q.grad is None for q in p.original.parameters())
    # With the head still equal to the original, benign activations already match: only unsafe ones pull.
    opt = torch.optim.Adam(p.head.parameters(), lr=1e-3)
    before = terms["scramble"].item()
    for _ in range(20):
        opt.zero_grad()
        p.terms(torch.Generator().manual_seed(0), scramble=True)["scramble"].backward()
        opt.step()
    assert p.terms(torch.Generator().manual_seed(0), scramble=True)["scramble"].item() < before


def test_perceptual_calibration_is_zero_for_the_original_decoder_and_leaves_the_other_terms(mini_pipeline, tmp_path,
                                                                                             cfg):
    from accelerate import Accelerator

    from patronus.defenses.patronus.protect import Protector

    p = Protector(str(mini_pipeline), cfg, tmp_path / "w", Accelerator())
    plain = p.terms(torch.Generator().manual_seed(0))
    with_feat = p.terms(torch.Generator().manual_seed(0), cal_feat=True)
    assert "cal_feat" not in plain
    assert all(torch.equal(plain[k], with_feat[k]) for k in plain)  # same batch, same terms
    # Before any training the head is the original decoder: its benign images match in every feature.
    assert with_feat["cal_feat"].item() < 1e-10
    with torch.no_grad():
        p.head.decoder.conv_out.bias.add_(0.5)
    assert p.terms(torch.Generator().manual_seed(0), cal_feat=True)["cal_feat"].item() > 1e-4


def test_near_black_weighting_raises_the_cost_of_dimming_a_dark_image():
    from patronus.defenses.patronus.protect import _cal_weights

    bright = torch.full((1, 3, 4, 4), 0.5)
    dark = torch.full((1, 3, 4, 4), -0.9)  # close to the black refusal (-1)
    black = torch.full((1, 3, 4, 4), -1.0)
    w = _cal_weights(torch.cat([bright, dark, bright, black]))
    assert w.mean().item() == pytest.approx(1.0)
    assert w[1] > 5 * w[0]  # the same pixel error on the dark image now costs more
    assert torch.isfinite(w).all() and w[3] == w[1]  # capped: a black benign image cannot take over the batch


def test_an_unknown_calibration_weighting_is_refused(cfg):
    from dataclasses import replace

    from patronus.errors import ConfigError

    with pytest.raises(ConfigError, match="cal_weighting"):
        replace(cfg, cal_weighting="dark")


@pytest.mark.parametrize("setting", [{"frozen_dtype": "float16"}, {"best_checkpoint": "gpu"}])
def test_unknown_memory_settings_are_refused(cfg, setting):
    from dataclasses import replace

    from patronus.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(setting))):
        replace(cfg, **setting)


def test_the_best_checkpoint_on_disk_survives_a_resume_and_stays_the_best(tmp_path):
    """best_checkpoint = "disk": the best weights live in a file the checkpoints link to; a worse
    probe leaves them, a resume from a checkpoint brings back that checkpoint's best."""
    from accelerate import Accelerator

    from patronus.training import Checkpointer, RunState

    model = torch.nn.Linear(3, 2)
    run = RunState(Checkpointer(Accelerator(cpu=True), tmp_path / "stage2"), rank_by=("score",), best_on_disk=True)
    run.record_probe({"score": 1.0}, model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    run.save()  # the checkpoint links to the first best
    with torch.no_grad():
        model.weight.add_(1.0)
    run.record_probe({"score": 0.5}, model)  # worse: kept out
    assert all(torch.equal(run.best_weights()[k], first[k]) for k in first)
    run.record_probe({"score": 2.0}, model)  # better, after the checkpoint: then a kill
    assert torch.equal(run.best_weights()["weight"], model.weight)
    assert not run._best  # nothing held in memory
    again = RunState(Checkpointer(Accelerator(cpu=True), tmp_path / "stage2"), rank_by=("score",), best_on_disk=True)
    again.restore()
    assert again.state["best"] == {"score": 1.0}
    assert all(torch.equal(again.best_weights()[k], first[k]) for k in first)


def test_with_no_checkpoint_through_the_gate_the_nearest_to_it_is_kept(tmp_path):
    """`infeasible_rank_by`: among probes that all fail the gate, the one nearest to passing (benign
    class) wins over a better-scored broken one; a probe that passes beats both."""
    from accelerate import Accelerator

    from patronus.training import Checkpointer, RunState

    model = torch.nn.Linear(3, 2)
    rank = ("feasible", "score", "benign_class_match")
    run = RunState(Checkpointer(Accelerator(cpu=True), tmp_path / "a"), rank_by=rank,
                   infeasible_rank_by=("benign_class_match", "score"))
    broken = {"feasible": False, "score": 0.9, "benign_class_match": 0.41}
    near = {"feasible": False, "score": 0.1, "benign_class_match": 0.95}
    for probe in (broken, near):
        run.record_probe(probe, model)
    assert run.state["best"] == near
    passing = {"feasible": True, "score": 0.05, "benign_class_match": 0.99}
    run.record_probe(passing, model)
    assert run.state["best"] == passing
    by_score = RunState(Checkpointer(Accelerator(cpu=True), tmp_path / "b"), rank_by=rank)
    for probe in (broken, near):
        by_score.record_probe(probe, model)
    assert by_score.state["best"] == broken  # without it: the score decides, as for the decoder


def test_uniform_calibration_is_plain_mse_and_near_black_changes_only_the_calibration(mini_pipeline, tmp_path, cfg):
    from dataclasses import replace

    import torch.nn.functional as F
    from accelerate import Accelerator

    from patronus.defenses.patronus.protect import Protector

    uniform = Protector(str(mini_pipeline), cfg, tmp_path / "w", Accelerator())
    weighted = Protector(str(mini_pipeline), replace(cfg, cal_weighting="near-black"), tmp_path / "w2", Accelerator())
    for p in (uniform, weighted):
        with torch.no_grad():
            p.head.decoder.conv_out.bias.add_(0.5)
    a, b = (p.terms(torch.Generator().manual_seed(0)) for p in (uniform, weighted))
    assert all(torch.equal(a[k], b[k]) for k in a if k != "cal")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(uniform.bank["train/benign/z_gen"]), (cfg.batch_size,), generator=g)
    with torch.no_grad():
        decoded = uniform.head(uniform.bank["train/benign/z_gen"][idx])
    assert a["cal"].item() == pytest.approx(F.mse_loss(decoded, uniform.orig_benign_gen[idx]).item(), rel=1e-5)
    assert b["cal"].item() != pytest.approx(a["cal"].item(), rel=1e-3)


def test_run_time_adds_up_over_resumed_sessions(tmp_path, monkeypatch):
    """A resumed run's recorded cost includes the sessions before the kill, not only its last."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from patronus import training
    from patronus.training import Checkpointer, RunState

    now = [100.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(time=lambda: now[0]))
    first = RunState(Checkpointer(Accelerator(cpu=True), tmp_path))
    now[0] = 130.0
    first.save()  # 30 s of work, then a kill
    now[0] = 500.0  # a new session
    again = RunState(Checkpointer(Accelerator(cpu=True), tmp_path))
    again.restore()
    now[0] = 520.0
    assert again.worked_seconds() == 30.0 + 20.0


def test_a_second_protect_on_the_same_work_directory_is_refused(mini_pipeline, tmp_path, cfg):
    from patronus.io import DirectoryBusyError, locked_dir

    work = tmp_path / "work"
    work.mkdir()
    with locked_dir(work, "held by the first run"):
        with pytest.raises(DirectoryBusyError, match="another protect run is using the work directory"):
            protect(str(mini_pipeline), tmp_path / "out", cfg, work)
    assert not (tmp_path / "out").exists() and list(work.iterdir()) == []


def test_a_full_disk_ends_with_a_clear_error_and_a_resumable_checkpoint(mini_pipeline, tmp_path, cfg, monkeypatch):
    """The second checkpoint write fails (ENOSPC): one clear error naming the intact checkpoint;
    resuming once there is space again ends with the weights of a run that never failed."""
    import errno

    from accelerate import Accelerator

    from patronus.errors import WriteError

    whole = protect(str(mini_pipeline), tmp_path / "whole", cfg, tmp_path / "w-whole")
    real, calls = Accelerator.save_state, []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(WriteError, match=r"No space left on device\); .*checkpoint-1000002 is intact: free space"):
        protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "work").glob("tmp-checkpoint-*"))
    monkeypatch.setattr(Accelerator, "save_state", real)
    info = protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work", resume=True)
    assert info["weight_files_sha256"] == whole["weight_files_sha256"]


def test_a_full_disk_while_writing_an_output_keeps_nothing(tmp_path):
    import errno

    from patronus.errors import WriteError
    from patronus.io import atomic_dir

    with pytest.raises(WriteError, match="cannot write .*out .No space left on device.; nothing was kept"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_need_no_unrestricted_unpickling(mini_pipeline, tmp_path, cfg):
    """Models are safetensors, schedulers JSON, optimizer states read with weights_only=True; the
    only other pickles are accelerate's RNG states, which it reads with weights_only=True too
    (and fails to, harmlessly: every step draws from its own seeded generator)."""
    protect(str(mini_pipeline), tmp_path / "out", cfg, tmp_path / "work")
    files = [f for f in (tmp_path / "work").rglob("checkpoint-*/*") if f.is_file()]
    assert files and not [f for f in files if f.name.startswith("custom_checkpoint")]
    for f in files:
        if f.suffix == ".bin":
            torch.load(f, weights_only=True)
        else:
            assert f.suffix in (".safetensors", ".json") or f.name.startswith("random_states_"), f


def test_checkpoints_from_before_json_schedulers_resume(tmp_path):
    """A checkpoint whose schedule accelerate pickled (register_for_checkpointing) is read with
    the restricted unpickler, kept as JSON, and the pickle removed."""
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from patronus.training import Checkpointer

    def setup():
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return model, opt, get_cosine_schedule_with_warmup(opt, 2, 10)

    acc = Accelerator(cpu=True)
    model, opt, sched = setup()
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)  # the old way
    for _ in range(3):
        opt.step()
        sched.step()
    Checkpointer(acc, tmp_path).save(5, {"step": 5})
    assert (tmp_path / "checkpoint-5" / "custom_checkpoint_0.pkl").exists()

    acc2 = Accelerator(cpu=True)
    model2, opt2, sched2 = setup()
    model2, opt2 = acc2.prepare(model2, opt2)
    state, _ = Checkpointer(acc2, tmp_path, schedulers=(sched2,)).restore()
    assert state == {"step": 5} and sched2.state_dict() == sched.state_dict()
    assert not (tmp_path / "checkpoint-5" / "custom_checkpoint_0.pkl").exists()
    assert (tmp_path / "checkpoint-5" / "schedulers.json").exists()


def test_flagged_only_refuses_only_what_the_detector_flags(mini_pipeline, tmp_path, cfg, monkeypatch):
    """`bank.flagged_only`: an unsafe UNet latent whose decoding the detector does not flag (a
    filtered model answers unsafe prompts with benign images) becomes its image's encoder latent;
    flagged ones stay, and the decoder's targets are made from the replaced bank."""
    from dataclasses import replace

    from accelerate import Accelerator

    from patronus.defenses.patronus.protect import Protector

    protect_module = sys.modules[Protector.__module__]  # the package's `protect` names the function
    plain = Protector(str(mini_pipeline), cfg, tmp_path / "w", Accelerator())
    # Flag every other image of each decoded batch (each partition's batch fits in one).
    monkeypatch.setattr(protect_module, "detect_decoded",
                        lambda detector, images: [{"unsafe": i % 2 == 0} for i in range(len(images))])
    # The same work directory: the bank is read from the first one's cache (`flagged_only` is not in its key).
    p = Protector(str(mini_pipeline), replace(cfg, bank=replace(cfg.bank, flagged_only=True)), tmp_path / "w",
                  Accelerator())
    assert p.unflagged == {"train": 8, "query": 4, "probe": 4}
    for part in ("train", "query", "probe"):
        before, after = plain.bank[f"{part}/unsafe/z_gen"], p.bank[f"{part}/unsafe/z_gen"]
        assert torch.equal(after[0::2], before[0::2])
        assert torch.equal(after[1::2], p.bank[f"{part}/unsafe/z_img"][1::2])
        assert not torch.equal(after[1::2], before[1::2])
        assert torch.equal(p.bank[f"{part}/unsafe/z_img"], plain.bank[f"{part}/unsafe/z_img"])
    assert torch.equal(p.bank["train/benign/z_gen"], plain.bank["train/benign/z_gen"])
    with torch.no_grad():
        assert torch.allclose(p.orig_unsafe_gen, p.original(p.bank["train/unsafe/z_gen"]))
    assert torch.equal(p.attack_data["z_gen"], p.bank["train/unsafe/z_gen"])


def test_flagged_only_keeps_the_aligned_unets_refusals(mini_pipeline, tmp_path, cfg, monkeypatch):
    """The "aligned" source's unsafe latents are refusals by design: never checked, never replaced,
    even when the detector flags nothing at all."""
    from dataclasses import replace

    from accelerate import Accelerator

    from patronus.defenses.patronus.protect import Protector

    protect_module = sys.modules[Protector.__module__]
    aligned = StableDiffusionPipeline.from_pretrained(mini_pipeline).unet
    torch.manual_seed(3)
    for p in aligned.parameters():  # unlike the original UNet, so that its block shows
        p.data.add_(torch.randn_like(p) * 0.05)
    both = replace(cfg, parts=("decoder", "unet"), bank=replace(cfg.bank, unet_sources=("original", "aligned")))
    plain = Protector(str(mini_pipeline), both, tmp_path / "w", Accelerator(), aligned)
    monkeypatch.setattr(protect_module, "detect_decoded", lambda detector, images: [{"unsafe": False}] * len(images))
    p = Protector(str(mini_pipeline), replace(both, bank=replace(both.bank, flagged_only=True)), tmp_path / "w",
                  Accelerator(), aligned)
    assert p.unflagged == {"train": 16, "query": 8, "probe": 8}  # the original block only
    for part, n in (("train", 16), ("query", 8), ("probe", 8)):
        after, before = p.bank[f"{part}/unsafe/z_gen"], plain.bank[f"{part}/unsafe/z_gen"]
        assert torch.equal(after[:n], p.bank[f"{part}/unsafe/z_img"])
        assert torch.equal(after[n:], before[n:]) and not torch.equal(before[:n], before[n:])


@pytest.mark.parametrize("setting,name", [({"probe_max_grad_norm": 0}, "probe_max_grad_norm"),
                                          ({"unet": {"probe_max_grad_norm": -1}}, "unet.probe_max_grad_norm"),
                                          ({"attacks": {"max_grad_norm": 0}}, "attacks.max_grad_norm"),
                                          ({"unet": {"attacks": {"max_grad_norm": -1}}}, "unet.attacks.max_grad_norm")])
def test_a_bad_clip_norm_for_a_probe_or_simulated_attacker_is_refused_by_its_name(tmp_path, setting, name):
    import re

    from patronus.errors import ConfigError

    path = tmp_path / "clip.json"
    path.write_text(json.dumps(TINY_RUN | setting))
    with pytest.raises(ConfigError, match=f"^{re.escape(name)} must be a positive finite number"):
        load_config("quick", path)


def test_the_attacked_bank_sources_cache_key_holds_no_unset_clipping():
    """Caches written before `max_grad_norm` existed keep their key; a clipped attack gets another."""
    from patronus.attacks.weights.unet import UNetAttackConfig
    from patronus.defenses.patronus.protect import attack_key

    plain = UNetAttackConfig("adam", 1e-4, 300, 16, 64, seed=11)
    assert attack_key(plain) == {"optimizer": "adam", "lr": 1e-4, "steps": 300, "batch_size": 16, "lora_rank": 64,
                                 "seed": 11, "schedule": "constant"}  # the key's fields before clipping existed
    assert attack_key(UNetAttackConfig("adam", 1e-4, 300, 16, 64, seed=11, max_grad_norm=1.0))["max_grad_norm"] == 1.0


def test_a_run_started_before_gradient_clipping_resumes_unclipped_only(tmp_path, cfg):
    """config.json written before the clipping settings existed: the run resumes while they stay
    unset, and is refused once one of them clips."""
    from dataclasses import replace

    from patronus.config import to_dict
    from patronus.defenses.patronus.protect import _check_dirs
    from patronus.errors import ConfigError

    saved = to_dict(cfg)
    del saved["probe_max_grad_norm"], saved["unet"]["probe_max_grad_norm"]
    del saved["attacks"]["max_grad_norm"], saved["unet"]["attacks"]["max_grad_norm"]
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(saved))
    _check_dirs(tmp_path / "out", work, cfg, resume=True)
    with pytest.raises(ConfigError, match="different settings"):
        _check_dirs(tmp_path / "out", work, replace(cfg, probe_max_grad_norm=1.0), resume=True)
