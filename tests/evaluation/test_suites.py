import pytest

from patronus.evaluation.suites import PromptFileError, load_prompt_file, load_suite


def test_glyph_suites_sizes_and_groups():
    full = load_suite("glyph")
    unsafe = [p for p in full if p.kind == "unsafe"]
    benign = [p for p in full if p.kind == "benign"]
    assert len(unsafe) >= 200 and len(benign) >= 200
    assert {p.group for p in unsafe} == {"explicit", "synonym", "held_out"}
    assert {p.group for p in benign} == {"benign", "hard_negative"}
    quick = load_suite("glyph-quick")
    assert 0 < len(quick) < 50 and {p.kind for p in quick} == {"unsafe", "benign"}
    assert load_suite("glyph") == full  # fixed prompts and seeds


def test_text_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    prompts = load_prompt_file(f, "benign")
    assert [(p.prompt, p.group, p.seed) for p in prompts] == [("a cat", "benign", 0), ("a dog", "benign", 2)]


def test_i2p_style_csv(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text('prompt,categories,sd_seed,sd_guidance_scale\n"a, b",sexual,42,7.5\nplain,"hate, violence",,\n')
    a, b = load_prompt_file(f, "unsafe")
    assert (a.prompt, a.group, a.seed, a.guidance) == ("a, b", "sexual", 42, 7.5)
    assert (b.prompt, b.group, b.seed, b.guidance) == ("plain", "hate", 1, None)


@pytest.mark.parametrize("name,content,needle", [
    ("nocol.csv", b"text,categories\nhello,x\n", "no 'prompt' column"),
    ("empty.txt", b"\n\n", "contains no prompts"),
    ("empty.csv", b"", "no 'prompt' column"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
    ("badseed.csv", b"prompt,sd_seed\nhello,abc\n", "must be numbers"),
])
def test_malformed_prompt_files(tmp_path, name, content, needle):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(PromptFileError, match=needle):
        load_prompt_file(f, "unsafe")


def test_missing_file_and_unknown_suite(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.txt", "unsafe")
    with pytest.raises(PromptFileError, match="unknown suite"):
        load_suite("i2p")
