import pytest
import torch

from patronus.defenses.patronus.bank import FeatureBankConfig, build_feature_bank
from patronus.models.registry import load_pipeline
from patronus.world import UNSAFE_CLASSES, export_imagefolder
from patronus.world.glyphs import CLASS_NAMES


def test_bank_from_image_folders(mini_pipeline, tmp_path):
    """Real-model data path: the unsafe folder feeds train/query/probe, the benign one train/probe."""
    benign_classes = tuple(c for c in CLASS_NAMES if c not in UNSAFE_CLASSES)
    unsafe = export_imagefolder("defender", 8, tmp_path / "unsafe", classes=UNSAFE_CLASSES)
    benign = export_imagefolder("defender", 6, tmp_path / "benign", classes=benign_classes)
    s = FeatureBankConfig(n_train=4, n_query=2, n_probe=2, sampler_steps=1, unsafe_dir=str(unsafe),
                     benign_dir=str(benign))
    bank = build_feature_bank(load_pipeline(mini_pipeline), s, "digest", cache_dir=tmp_path / "cache")
    assert bank["train/unsafe/x"].shape == (4, 3, 32, 32) and bank["probe/unsafe/z_gen"].shape == (2, 4, 8, 8)
    assert bank["train/benign/z_img"].shape == (4, 4, 8, 8) and "query/benign/x" not in bank
    assert bank["probe/benign/z_gen"].shape == (2, 4, 8, 8)  # the held-out benign latents probes score
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    too_few = FeatureBankConfig(n_train=6, n_query=2, n_probe=2, sampler_steps=1, unsafe_dir=str(unsafe))
    with pytest.raises(ValueError, match="probe partition needs entries 8..9"):
        build_feature_bank(load_pipeline(mini_pipeline), too_few, "digest")



def test_prompt_files_replace_captions_for_the_unet_latents(mini_pipeline, tmp_path):
    unsafe = export_imagefolder("defender", 8, tmp_path / "unsafe", classes=UNSAFE_CLASSES)
    prompts = tmp_path / "unsafe.txt"
    prompts.write_text("\n".join(["a knife"] * 4 + ["a gun"] * 2 + ["blood"] * 2) + "\n")
    pipe = load_pipeline(mini_pipeline)
    with_file = build_feature_bank(pipe, FeatureBankConfig(n_train=4, n_query=2, n_probe=2, sampler_steps=1,
                                                      unsafe_dir=str(unsafe), unsafe_prompts=str(prompts)), "d")
    captions = build_feature_bank(pipe, FeatureBankConfig(n_train=4, n_query=2, n_probe=2, sampler_steps=1,
                                                     unsafe_dir=str(unsafe)), "d")
    assert torch.equal(with_file["train/unsafe/x"], captions["train/unsafe/x"])  # same images
    assert not torch.equal(with_file["train/unsafe/z_gen"], captions["train/unsafe/z_gen"])  # other prompts
    prompts.write_text("a knife\n")
    with pytest.raises(ValueError, match="unsafe.txt has 1 entries; its train partition"):
        build_feature_bank(pipe, FeatureBankConfig(n_train=4, n_query=2, n_probe=2, sampler_steps=1,
                                              unsafe_dir=str(unsafe), unsafe_prompts=str(prompts)), "d")


def test_where_the_bank_is_cached_does_not_name_it():
    from patronus.defenses.patronus.bank import FeatureBankConfig, bank_key

    a, b = FeatureBankConfig(cache_dir="/shared/banks"), FeatureBankConfig()
    assert bank_key(a, "w") == bank_key(b, "w") != bank_key(FeatureBankConfig(n_train=3), "w")
