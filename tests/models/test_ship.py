import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from patronus.errors import OutputExistsError, PatronusError
from patronus.models.registry import PROTECTED_DIR, TINY_DIR, load_pipeline, resolve_model
from patronus.models.ship import ship
from patronus.provenance import generation_digest, weight_hashes, weights_digest


def _fake_run(tmp_path, changed=("vae/diffusion_pytorch_model.safetensors",), parts=("decoder",)):
    """A directory shaped like `patronus protect`'s output, with a perturbed decoder."""
    run = tmp_path / "run"
    shutil.copytree(TINY_DIR, run)
    vae = AutoencoderKL.from_pretrained(run / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.01
    vae.save_pretrained(run / "vae")
    info = {"source_model": {"path": str(TINY_DIR), "weights_sha256": weights_digest(weight_hashes(TINY_DIR))},
            "parts": list(parts), "changed_weight_files": list(changed), "weight_files_sha256": weight_hashes(run)}
    (run / "patronus.json").write_text(json.dumps(info))
    return run


def test_ship_links_everything_but_the_vae(tmp_path):
    run = _fake_run(tmp_path)
    out = ship(run, "tiny-variant", assets=tmp_path / "assets")
    assert (out / "unet").is_symlink() and not (out / "vae").is_symlink()
    assert weight_hashes(out) == weight_hashes(run)
    assert generation_digest(out) == generation_digest(TINY_DIR)
    info = json.loads((out / "patronus.json").read_text())
    assert info["source_model"]["path"] == "patronus-tiny" and info["shipped_as"] == "tiny-variant"
    bias = load_pipeline(out).vae.decoder.conv_out.bias
    assert torch.allclose(bias, load_pipeline("patronus-tiny").vae.decoder.conv_out.bias + 0.01)
    with pytest.raises(OutputExistsError):
        ship(run, "tiny-variant", assets=tmp_path / "assets")


def test_ship_copies_a_protected_unet_too(tmp_path):
    run = _fake_run(tmp_path, changed=("unet/diffusion_pytorch_model.safetensors",
                                       "vae/diffusion_pytorch_model.safetensors"))
    out = ship(run, "two-part", assets=tmp_path / "assets")
    assert not (out / "unet").is_symlink() and not (out / "vae").is_symlink() and (out / "text_encoder").is_symlink()
    assert weight_hashes(out) == weight_hashes(run)


def test_ship_copies_a_text_encoder_that_a_mark_stage_changed(tmp_path):
    run = _fake_run(tmp_path, changed=("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
                    parts=("mark", "decoder"))
    encoder = CLIPTextModel.from_pretrained(run / "text_encoder")
    with torch.no_grad():
        encoder.get_input_embeddings().weight[5] += 0.01  # as a marked row would
    encoder.save_pretrained(run / "text_encoder")
    info = json.loads((run / "patronus.json").read_text())
    (run / "patronus.json").write_text(json.dumps({**info, "weight_files_sha256": weight_hashes(run)}))
    out = ship(run, "marked", assets=tmp_path / "assets")
    assert not (out / "text_encoder").is_symlink() and (out / "unet").is_symlink()
    assert weight_hashes(out) == weight_hashes(run) != weight_hashes(TINY_DIR)


def test_ship_refuses_runs_it_cannot_vouch_for(tmp_path):
    run = _fake_run(tmp_path, changed=("text_encoder/model.safetensors",))
    with pytest.raises(PatronusError, match="only vae and unet may differ.*after a \\[mark\\] stage"):
        ship(run, "x", assets=tmp_path / "assets")
    run = _fake_run(tmp_path / "second")
    (run / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(PatronusError, match="not the ones its patronus.json records"):
        ship(run, "x", assets=tmp_path / "assets")
    assert not (tmp_path / "assets" / "x").exists()


def test_shipped_protected_model_is_patronus_tiny_with_both_parts_protected():
    assert resolve_model("patronus-tiny-protected") == PROTECTED_DIR
    info = json.loads((PROTECTED_DIR / "patronus.json").read_text())
    assert weight_hashes(PROTECTED_DIR) == info["weight_files_sha256"]
    assert info["parts"] == ["decoder", "unet"]
    assert info["changed_weight_files"] == ["unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors"]
    assert info["config"]["stage2_steps"] > 0 and info["config"]["unet"]["nft_steps"] > 0
    assert info["config"]["unet"]["w_unknown"] == 1.0  # v5: it can still learn new benign words
    assert info["shipped_as"] == "patronus-tiny-protected"
    for shared in ("text_encoder", "tokenizer", "scheduler"):  # linked to the original, not copied
        assert (PROTECTED_DIR / shared).is_symlink()
