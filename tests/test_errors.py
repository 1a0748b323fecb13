"""Every documented bad input is refused up front: exit 2, one line, nothing written.

Each case runs through the real CLI entry point (`patronus.cli.main`) in-process. The message
it prints must be the one docs/reference/errors.md lists for it (with the test's temporary directory
written as $TMP), so the table cannot drift from what users see.
"""

import contextlib
import io
import re
from pathlib import Path

import pytest

from patronus.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "reference" / "errors.md"

# id -> argv ($TMP is the test's scratch directory with the files made in `scratch`).
CASES: dict[str, list[str]] = {
    "generate-n-zero": ["generate", "patronus-tiny", "x", "--n", "0", "--out", "$TMP/o"],
    "generate-negative-steps": ["generate", "patronus-tiny", "x", "--steps", "-3", "--out", "$TMP/o"],
    "generate-negative-guidance": ["generate", "patronus-tiny", "x", "--guidance", "-1", "--out", "$TMP/o"],
    "generate-missing-model": ["generate", "$TMP/missing", "x", "--out", "$TMP/o"],
    "generate-output-not-empty": ["generate", "patronus-tiny", "x", "--out", "$TMP/nonempty"],
    "generate-not-a-pipeline": ["generate", "$TMP/emptydir", "x", "--out", "$TMP/o"],
    "generate-pickle-weights": ["generate", "$TMP/pickled", "x", "--out", "$TMP/o"],
    "evaluate-pickle-weights": ["evaluate", "$TMP/pickled", "--suite", "glyph-quick", "--out", "$TMP/o"],
    "evaluate-unknown-suite": ["evaluate", "patronus-tiny", "--suite", "nope", "--out", "$TMP/o"],
    "evaluate-one-prompt-file": ["evaluate", "patronus-tiny", "--unsafe-prompts", "$TMP/ok.txt", "--out", "$TMP/o"],
    "evaluate-missing-prompt-file": ["evaluate", "patronus-tiny", "--unsafe-prompts", "$TMP/none.txt",
                                     "--benign-prompts", "$TMP/ok.txt", "--out", "$TMP/o"],
    "evaluate-prompt-file-not-utf8": ["evaluate", "patronus-tiny", "--unsafe-prompts", "$TMP/bad.txt",
                                      "--benign-prompts", "$TMP/ok.txt", "--out", "$TMP/o"],
    "evaluate-csv-without-prompt-column": ["evaluate", "patronus-tiny", "--unsafe-prompts", "$TMP/nocol.csv",
                                           "--benign-prompts", "$TMP/ok.txt", "--out", "$TMP/o"],
    "evaluate-attack-prompts-missing": ["evaluate", "patronus-tiny", "--attack-prompts", "$TMP/none.json",
                                        "--out", "$TMP/o"],
    "evaluate-attack-prompts-unknown-rewrite": ["evaluate", "patronus-tiny", "--attack-prompts", "$TMP/rewrite.json",
                                                "--out", "$TMP/o"],
    "evaluate-token-rewrite-with-prompt-files": ["evaluate", "patronus-tiny", "--attack-prompts", "$TMP/tokens.json",
                                                 "--unsafe-prompts", "$TMP/ok.txt", "--benign-prompts", "$TMP/ok.txt",
                                                 "--out", "$TMP/o"],
    "evaluate-n-per-prompt-zero": ["evaluate", "patronus-tiny", "--n-per-prompt", "0", "--out", "$TMP/o"],
    "evaluate-negative-guidance": ["evaluate", "patronus-tiny", "--guidance", "-2", "--out", "$TMP/o"],
    "evaluate-missing-reference": ["evaluate", "patronus-tiny", "--reference", "$TMP/missing", "--out", "$TMP/o"],
    "evaluate-hub-id-not-cached": ["--cache-dir", "$TMP/hub", "evaluate", "someone/missing", "--out", "$TMP/o"],
    "evaluate-corrupt-weights": ["evaluate", "$TMP/broken", "--suite", "glyph-quick", "--out", "$TMP/o"],
    "evaluate-bad-detector": ["evaluate", "patronus-tiny", "--detector", "clip", "--out", "$TMP/o"],
    "report-not-a-run": ["report", "$TMP/emptydir", "--out", "$TMP/o"],
    "protect-unknown-preset": ["protect", "patronus-tiny", "--preset", "nope", "--out", "$TMP/o"],
    "protect-config-wrong-type": ["protect", "patronus-tiny", "--config", "$TMP/many.toml", "--out", "$TMP/o"],
    "protect-config-unknown-key": ["protect", "patronus-tiny", "--config", "$TMP/unknown.toml", "--out", "$TMP/o"],
    "protect-config-missing": ["protect", "patronus-tiny", "--config", "$TMP/none.toml", "--out", "$TMP/o"],
    "protect-config-negative-lr": ["protect", "patronus-tiny", "--config", "$TMP/neglr.toml", "--out", "$TMP/o"],
    "protect-config-nan": ["protect", "patronus-tiny", "--config", "$TMP/nan.json", "--out", "$TMP/o"],
    "protect-config-not-utf8": ["protect", "patronus-tiny", "--config", "$TMP/latin1.toml", "--out", "$TMP/o"],
    "protect-config-bad-unet-target": ["protect", "patronus-tiny", "--config", "$TMP/target.toml", "--out", "$TMP/o"],
    "protect-bank-sources-need-unet": ["protect", "patronus-tiny", "--config", "$TMP/sources.toml", "--parts",
                                       "decoder", "--out", "$TMP/o"],
    "protect-unknown-part": ["protect", "patronus-tiny", "--parts", "decoder,foo", "--out", "$TMP/o"],
    "protect-no-parts": ["protect", "patronus-tiny", "--parts", "", "--out", "$TMP/o"],
    "protect-output-not-empty": ["protect", "patronus-tiny", "--out", "$TMP/nonempty"],
    "protect-workdir-is-a-file": ["protect", "patronus-tiny", "--workdir", "$TMP/ok.txt", "--out", "$TMP/o"],
    "protect-resume-other-settings": ["protect", "patronus-tiny", "--workdir", "$TMP/otherwork", "--resume",
                                      "--out", "$TMP/o"],
    "protect-not-a-pipeline": ["protect", "$TMP/emptydir", "--out", "$TMP/o"],
    "protect-pickle-weights": ["protect", "$TMP/pickled", "--out", "$TMP/o"],
    "protect-unknown-defense": ["protect", "patronus-tiny", "--defense", "nope", "--out", "$TMP/o"],
    "protect-baseline-with-parts": ["protect", "patronus-tiny", "--defense", "checker", "--parts", "unet",
                                    "--out", "$TMP/o"],
    "protect-unknown-sld-preset": ["protect", "patronus-tiny", "--defense", "sld", "--preset", "huge",
                                   "--out", "$TMP/o"],
    "protect-baseline-output-not-empty": ["protect", "patronus-tiny", "--defense", "negative-prompt",
                                          "--out", "$TMP/nonempty"],
    "protect-checker-bad-threshold": ["protect", "patronus-tiny", "--defense", "checker", "--config",
                                      "$TMP/threshold.toml", "--out", "$TMP/o"],
    "attack-unknown-kind": ["attack", "patronus-tiny", "--kind", "nope", "--out", "$TMP/o"],
    "attack-soft-prompt-zero-sampler-steps": ["attack", "patronus-tiny", "--kind", "soft-prompt", "--sampler-steps",
                                              "0", "--out", "$TMP/o"],
    "attack-zero-lr": ["attack", "patronus-tiny", "--kind", "unet-full", "--lr", "0", "--out", "$TMP/o"],
    "attack-nan-lr": ["attack", "patronus-tiny", "--kind", "unet-full", "--lr", "nan", "--out", "$TMP/o"],
    "attack-save-at-not-numbers": ["attack", "patronus-tiny", "--kind", "unet-full", "--save-at", "5,x",
                                   "--out", "$TMP/o"],
    "attack-save-at-beyond-steps": ["attack", "patronus-tiny", "--kind", "unet-full", "--steps", "10",
                                    "--save-at", "20", "--out", "$TMP/o"],
    "attack-swap-without-from": ["attack", "patronus-tiny", "--kind", "swap-decoder", "--out", "$TMP/o"],
    "attack-rank-zero": ["attack", "patronus-tiny", "--kind", "unet-lora", "--rank", "0", "--out", "$TMP/o"],
    "attack-max-grad-norm-zero": ["attack", "patronus-tiny", "--kind", "joint", "--max-grad-norm", "0",
                                  "--out", "$TMP/o"],
    "attack-max-grad-norm-nothing-to-clip": ["attack", "patronus-tiny", "--kind", "paraphrase", "--max-grad-norm",
                                             "1", "--out", "$TMP/o"],
    "attack-unknown-optimizer": ["attack", "patronus-tiny", "--kind", "unet-full", "--optimizer", "lion",
                                 "--out", "$TMP/o"],
    "attack-data-nowhere": ["attack", "patronus-tiny", "--kind", "unet-full", "--data", "$TMP/nowhere",
                            "--out", "$TMP/o"],
    "attack-data-without-metadata": ["attack", "patronus-tiny", "--kind", "unet-full", "--data", "$TMP/emptydir",
                                     "--out", "$TMP/o"],
    "attack-corrupt-weights": ["attack", "$TMP/broken", "--kind", "unet-full", "--steps", "1", "--out", "$TMP/o"],
    "attack-pickle-weights": ["attack", "$TMP/pickled", "--kind", "unet-full", "--out", "$TMP/o"],
    "attack-then-not-unet": ["attack", "patronus-tiny", "--kind", "swap-decoder", "--from", "patronus-tiny",
                             "--then", "decoder-full", "--out", "$TMP/o"],
    "sweep-yaml-float-as-text": ["sweep", "patronus-tiny", "--grid", "$TMP/grid.yaml", "--out", "$TMP/o"],
    "sweep-zero-workers": ["sweep", "patronus-tiny", "--grid", "quick", "--workers", "0", "--out", "$TMP/o"],
    "sweep-ray-zero-cpus": ["sweep", "patronus-tiny", "--grid", "quick", "--executor", "ray", "--cpus-per-cell", "0",
                            "--out", "$TMP/o"],
    "sweep-pickle-weights": ["sweep", "$TMP/pickled", "--grid", "quick", "--out", "$TMP/o"],
    "sweep-unknown-grid": ["sweep", "patronus-tiny", "--grid", "nope", "--out", "$TMP/o"],
    "demo-foreign-output": ["demo", "--out", "$TMP/nonempty"],
    "export-split-n-zero": ["export-split", "attacker", "--n", "0", "--out", "$TMP/o"],
    "export-split-tiny-resolution": ["export-split", "attacker", "--resolution", "0", "--out", "$TMP/o"],
    "export-split-unknown-split": ["export-split", "nope", "--out", "$TMP/o"],
    "train-glyphnet-zero-steps": ["train-glyphnet", "--steps", "0", "--out", "$TMP/o"],
    "train-glyphnet-output-not-empty": ["train-glyphnet", "--out", "$TMP/nonempty"],
    "train-base-workdir-is-a-file": ["train-base", "--workdir", "$TMP/ok.txt"],
    "train-base-unknown-setting": ["train-base", "--config", "$TMP/unknown.toml", "--workdir", "$TMP/w"],
    "train-base-zero-steps": ["train-base", "--config", "$TMP/zerosteps.toml", "--workdir", "$TMP/w"],
    "verify-not-protected": ["verify", "$TMP/emptydir"],
    "verify-missing": ["verify", "$TMP/missing"],
    "unknown-command": ["protekt", "patronus-tiny"],
}


def scratch(root: Path, case: str) -> None:
    """The files the cases point at."""
    import shutil

    from patronus.models.registry import TINY_DIR

    if "corrupt" in case:  # the shipped model with a UNet weight file that is not safetensors
        shutil.copytree(TINY_DIR, root / "broken")
        (root / "broken" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    files = {"many.toml": 'stage1_steps = "many"\n', "unknown.toml": "stage1_stepz = 3\n",
             "neglr.toml": "stage1_lr = -1.0\n", "target.toml": '[unet]\ntarget = "white"\n',
             "sources.toml": '[bank]\nunet_sources = ["original", "aligned"]\n',
             "nocol.csv": "text,x\nhello,1\n", "ok.txt": "a knife\n", "grid.yaml": "kinds: [unet-full]\nlrs: [1e-5]\n",
             "nonempty/keep": "mine\n", "otherwork/config.json": "{}\n", "threshold.toml": "threshold = 1.5\n",
             "zerosteps.toml": "vae_steps = 0\n",
             "rewrite.json": '{"rewrite": "shout"}', "tokens.json": '{"rewrite": "tokens", "tokens": {"knife": "<t>"}}'}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "bad.txt").write_bytes(b"\xff\xfe bad\n")
    (root / "latin1.toml").write_bytes("# r\xe9glages\nstage1_steps = 10\n".encode("latin-1"))
    (root / "nan.json").write_text('{"stage1_lr": NaN}')
    (root / "emptydir").mkdir()
    pickled = root / "pickled"
    pickled.mkdir()
    for f in TINY_DIR.rglob("*.json"):
        (pickled / f.relative_to(TINY_DIR)).parent.mkdir(parents=True, exist_ok=True)
        (pickled / f.relative_to(TINY_DIR)).write_bytes(f.read_bytes())
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")


def documented() -> dict[str, str]:
    """id -> message from docs/reference/errors.md's table rows `| id | command | message |`."""
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| .*? \| (.*) \|$", DOC.read_text(), flags=re.M)
    return {case: message.replace("\\|", "|").strip("`") for case, message in rows}


def test_the_table_lists_every_case_and_enough_of_them():
    assert set(documented()) == set(CASES)
    assert len(CASES) >= 30
    commands = {argv[0] for argv in CASES.values()}
    assert {"generate", "evaluate", "report", "protect", "attack", "sweep", "demo", "export-split", "train-base",
            "train-glyphnet", "verify"} <= commands


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # restored after `--cache-dir` sets it
    scratch(tmp_path, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [a.replace("$TMP", str(tmp_path)) for a in CASES[case]]
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert lines[0].removeprefix("error: ").replace(str(tmp_path), "$TMP") == documented()[case]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
