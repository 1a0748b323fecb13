from patronus.models.tokenizer import build_clip_tokenizer
from patronus.world import render_split
from patronus.world.captions import all_caption_words


def test_every_caption_word_is_one_token_and_round_trips(tmp_path):
    tok = build_clip_tokenizer()
    for word in all_caption_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    _, samples = render_split("eval", 50)
    tok.save_pretrained(tmp_path)
    reloaded = type(tok).from_pretrained(tmp_path)
    for s in samples:
        ids = tok(s.text).input_ids
        assert reloaded(s.text).input_ids == ids
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ,", ",") == s.text
        assert tok(decoded).input_ids == ids


def test_unknown_words_fall_back_to_bytes_not_unk():
    tok = build_clip_tokenizer()
    ids = tok("a zebra", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "a zebra"


def test_tokenizer_is_deterministic():
    assert build_clip_tokenizer().get_vocab() == build_clip_tokenizer().get_vocab()
