"""A real CLIP byte-level BPE tokenizer, built locally (no hub download).

The vocabulary is laid out like OpenAI CLIP's ``vocab.json``: the 256 byte symbols, the same with the
``</w>`` end-of-word suffix, the learned merges in order, then ``<|startoftext|>`` and ``<|endoftext|>``.
The merges are learned deterministically on a small built-in prompt corpus; every text (any unicode)
still encodes, because unknown words fall back to byte symbols, as in CLIP.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_SUBJECTS = "a photo of an astronaut riding horse cat dog castle city street portrait woman man robot forest mountain lake river ocean beach sunset sunrise flower garden car train ship dragon wizard knight girl boy house room kitchen bird owl fox wolf bear tiger lion".split()
_STYLES = "highly detailed digital painting oil on canvas watercolor sketch cinematic lighting sharp focus trending artstation concept art 8k 4k octane render unreal engine studio ghibli by greg rutkowski alphonse mucha beautiful intricate elegant dramatic soft volumetric fog golden hour bokeh hdr realistic photorealistic illustration anime style, masterpiece best quality".split()


def _corpus() -> list[str]:
    words = _SUBJECTS + _STYLES
    lines = []
    for i, (a, b) in enumerate(itertools.product(_SUBJECTS, _STYLES)):
        if i % 3 == 0:
            lines.append(f"{a} {b}, {words[(i * 7) % len(words)]} {words[(i * 13) % len(words)]}")
    return lines


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_pre_tokenizer():
    """transformers' CLIPTokenizer normaliser and pre-tokeniser, so learned merges fit its splits."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, pre


@lru_cache(maxsize=4)
def learn_clip_vocab(num_merges: int) -> tuple[dict[str, int], tuple[str, ...]]:
    """Return (vocab, merges) in CLIP's layout with at most ``num_merges`` merges.

    Plain BPE (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair. Ties go to the
    lexicographically smallest pair, so the vocabulary is the same in every process (the ``tokenizers``
    trainer breaks ties in hash order, which is not reproducible).
    """
    from collections import Counter

    normalizer, pre = _clip_pre_tokenizer()
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus():
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            symbols = list(word)
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges: list[str] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    byte_symbols = list(bytes_to_unicode().values())
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols]
    seen = set(vocab_list)
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in seen:
            seen.add(token)
            vocab_list.append(token)
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, tuple(merges)


def build_clip_tokenizer(num_merges: int, max_length: int = 77, pad_token: str = EOS):
    """A transformers ``CLIPTokenizer`` over the locally learned vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_clip_vocab(num_merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token, model_max_length=max_length)
