import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from patronus.cli import main
from patronus.models.registry import PROTECTED_DIR, TINY_DIR
from patronus.verify import verify

VAE = "vae/diffusion_pytorch_model.safetensors"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture()
def copy(tmp_path):
    """The shipped protected model as a plain directory (links resolved), free to tamper with."""
    out = tmp_path / "protected"
    shutil.copytree(PROTECTED_DIR, out, symlinks=False)
    return out


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(["verify", *argv])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr()


def test_untouched_protected_model_is_intact(capsys, copy):
    code, out = _run(capsys, "patronus-tiny-protected")
    assert code == 0 and ": intact;" in out.out and VAE in out.out
    assert verify(copy).intact


@pytest.mark.parametrize("part", [VAE, UNET])
def test_putting_an_original_component_back_is_named_as_a_swap(capsys, copy, part):
    shutil.copy(TINY_DIR / part, copy / part)
    code, out = _run(capsys, str(copy))
    assert code == 1
    name = part.split("/")[0]
    assert f"{name}/ is not the protected {name}" in out.out
    assert "unprotected original's file (a component swap)" in out.out


def test_one_edited_tensor_a_missing_and_an_extra_file_are_reported(capsys, copy):
    state = load_file(copy / UNET)
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    save_file(state, copy / UNET)
    (copy / "text_encoder" / "model.safetensors").unlink()
    (copy / "vae" / "extra.bin").write_bytes(b"not a weight file of the protected model")
    result = verify(copy)
    assert result.problems == [
        "text_encoder/model.safetensors is missing",
        f"unet/ is not the protected unet: {UNET} has a different sha256",
        "vae/extra.bin is an extra weight file, not in the manifest",
    ]
    assert _run(capsys, str(copy))[0] == 1


@pytest.mark.parametrize("setup,message", [
    (lambda d: (d / "patronus.json").unlink(), "has no patronus.json"),
    (lambda d: (d / "patronus.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "patronus.json").write_text(json.dumps({"config": {}})), "has no weight_files_sha256"),
])
def test_a_directory_without_a_manifest_exits_2(capsys, copy, setup, message):
    setup(copy)
    code, out = _run(capsys, str(copy))
    assert code == 2 and message in out.err and len(out.err.strip().splitlines()) == 1
