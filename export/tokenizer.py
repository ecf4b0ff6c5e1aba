"""A real CLIP byte-level BPE tokenizer, built locally (no hub download).

The vocabulary is laid out like OpenAI CLIP's ``vocab.json``: the 256 byte symbols, the same with the
``</w>`` end-of-word suffix, the learned merges in order, then ``<|startoftext|>`` and ``<|endoftext|>``.
The merges are learned with Hugging Face ``tokenizers`` on a small built-in prompt corpus, so every
text (any unicode) still encodes: unknown words fall back to byte symbols, as in CLIP.
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


@lru_cache(maxsize=4)
def learn_clip_vocab(num_merges: int) -> tuple[dict[str, int], tuple[str, ...]]:
    """Return (vocab, merges) in CLIP's layout with at most ``num_merges`` merges."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    # The same normalisation and pre-tokenisation as transformers' CLIPTokenizer.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    byte_symbols = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(byte_symbols) + num_merges,
        initial_alphabet=byte_symbols,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    import json

    learned = json.loads(tok.to_str())["model"]["merges"]
    merges = tuple((" ".join(m) if isinstance(m, list) else m) for m in learned)[:num_merges]
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols]
    seen = set(vocab_list)
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in seen:
            seen.add(merged)
            vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def build_clip_tokenizer(num_merges: int, max_length: int = 77, pad_token: str = EOS):
    """A transformers ``CLIPTokenizer`` over the locally learned vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_clip_vocab(num_merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token, model_max_length=max_length)
