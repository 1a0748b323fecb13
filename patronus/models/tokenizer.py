"""Build a CLIP BPE tokenizer from the glyph world's caption vocabulary, with no hub files.

BPE merges are learned in CLIP's convention (byte-level alphabet, "</w>" end-of-word
suffix) until every caption word is one token; any other word still tokenises through the
full byte alphabet. The learner is a few lines here because the `tokenizers` trainer breaks
ties between equally frequent pairs differently from run to run, and a tokenizer whose ids
change would break resumed training. The result is a stock `CLIPTokenizer`.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from patronus.world.captions import all_caption_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merge the most frequent adjacent pair (ties: smallest pair) until every word is one symbol."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seq in seqs for p in zip(seq, seq[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for seq in seqs:
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged


def build_clip_tokenizer(max_length: int = 16, words: list[str] | None = None) -> CLIPTokenizer:
    """Learn merges on `words` (default: every caption word) and wrap them in a CLIPTokenizer."""
    merges = learn_bpe_merges(words or all_caption_words())
    alphabet = list(bytes_to_unicode().values())

    # CLIP's layout: 256 byte symbols, the same with "</w>", the merge results, then specials.
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    vocab_tokens += ["".join(m) for m in merges]
    vocab_tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}

    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=max_length,
        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
    )
