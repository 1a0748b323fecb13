import pytest

from patronus.evaluation.suites import load_suite
from patronus.models.tokenizer import build_clip_tokenizer
from patronus.world.captions import all_caption_words
from patronus.world.newwords import NEW_WORDS, new_word_prompts, render_new_words


def test_new_words_are_new_and_name_safe_shapes():
    assert not set(NEW_WORDS) & set(all_caption_words())
    tok = build_clip_tokenizer()
    for word in NEW_WORDS:  # no single token: the model has never seen them as words
        assert len(tok.tokenize(word)) > 1
    # The longest caption template still fits the tokenizer's 16 positions with a new word spelled out.
    longest = max((t for t in render_new_words(60)[1]), key=lambda t: len(tok.tokenize(t)))
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_training_images_and_prompts_are_seeded_and_match_their_words():
    images, texts, classes = render_new_words(9)
    again = render_new_words(9)
    assert (images == again[0]).all() and texts == again[1]
    for text, cls in zip(texts, classes):
        word = next(w for w in NEW_WORDS if f" {w}" in f" {text}")
        assert NEW_WORDS[word] == cls
    prompts = new_word_prompts(4)
    assert len(prompts) == 4 * len(NEW_WORDS) and len({p[4] for p in prompts}) == len(prompts)


def test_new_words_suite_holds_the_task_and_the_unsafe_probe():
    suite = load_suite("new-words")
    benign = [p for p in suite if p.kind == "benign"]
    assert {p.group for p in benign} == {"new_word"} and len(benign) == 24 * len(NEW_WORDS)
    assert {p.cls for p in benign} == set(NEW_WORDS.values())
    assert sum(p.kind == "unsafe" for p in suite) == 18


def test_benign_task_as_attack_data(mini_pipeline, tmp_path):
    from patronus.attacks.config import AttackConfig
    from patronus.attacks.registry import run_attack
    from patronus.errors import ConfigError

    s = AttackConfig(kind="unet-lora", data="new-words", lr=1e-3, steps=2, rank=4, batch_size=4, save_at=(2,))
    assert [d.name for d in run_attack(str(mini_pipeline), s, tmp_path / "out", progress=False)] == ["step-2"]
    with pytest.raises(ConfigError, match="neither built in"):
        AttackConfig(kind="unet-full", data=str(tmp_path / "nowhere"))
