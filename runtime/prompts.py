"""Prompts as AUTOMATIC1111's web UI reads them: emphasis, BREAK, and prompts longer than 77 tokens.

- **Emphasis** (A1111 ``modules/prompt_parser.py``, "Original" emphasis): ``(text)`` x1.1, ``[text]`` /1.1,
  ``(text:1.5)`` explicit, nesting multiplies, ``\\( \\) \\[ \\] \\\\`` escape; unbalanced brackets apply to the
  rest of the prompt, unmatched closing ones are text. Each token's hidden state is multiplied by its weight,
  then the chunk is rescaled so its mean equals the unweighted mean (host NumPy; the graphs do not change).
- **Chunks** (A1111 ``modules/sd_hijack_clip.py``): the prompt is tokenized without truncation (each weighted
  fragment on its own) and cut into chunks of 75 tokens; each becomes ``[BOS] + tokens + [EOS]`` padded to 77
  (with EOS, then everything after the first EOS replaced by the pad token where the two differ, as SD 2's
  tokenizer has it) and is encoded on its own; the chunks' hidden states are concatenated (77 x k tokens). A
  comma within the last 20 tokens of a full chunk moves what follows it to the next chunk; ``BREAK`` (capitals,
  a word of its own) starts a new chunk. Prompts encoded together are padded to the same number of chunks with
  the encoding of the empty prompt (A1111's ``pad_cond``). One chunk is exactly the plain 77-token encoding.

Where this differs from A1111, on purpose: the emphasis mean is taken per prompt chunk, where A1111 takes it over
the batch its UI happens to encode together (the same thing for a batch of one prompt); a weight that is not a
number (``(a:1.2.3)``) is an error here, where A1111 raises a Python exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sdtrt.errors import UsageError

CHUNK_TOKENS = 75  # tokens of prompt per chunk; BOS and EOS make 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
MAX_CHUNKS = 16  # the longest text axis an export offers (--max-chunks): 1200 tokens
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_WEIGHT = -1.0

_TOKEN = re.compile(r"""
    \\[()\[\]\\]?            # an escape: \( \) \[ \] \\ (a lone backslash escapes nothing and vanishes)
  | (?P<open>[(\[])
  | :(?P<weight>[+-]?[.\d]+)\)  # (text:weight)
  | (?P<close>[)\]])
  | [^\\()\[\]:]+            # plain text
  | :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``'a (b:1.3) c'`` -> ``[('a ', 1.0), ('b', 1.3), (' c', 1.0)]``; ``BREAK`` comes back as ``('BREAK', -1.0)``."""
    out: list[list] = []
    opened = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif m.group("open"):
            opened[token].append(len(out))
        elif m.group("weight") is not None and opened["("]:
            try:
                weight = float(m.group("weight"))
            except ValueError:
                raise UsageError(f"prompt: the weight {m.group('weight')!r} in {token!r} is not a number") from None
            scale(opened["("].pop(), weight)
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append(["BREAK", BREAK_WEIGHT])
                out.append([part, 1.0])
    for start in opened["("]:  # unbalanced: the rest of the prompt
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    if not out:
        out = [["", 1.0]]
    merged: list[list] = [out[0]]
    for item in out[1:]:  # runs of one weight become one fragment
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as 77-token rows: ids ready for the text encoder and one weight per token."""

    ids: np.ndarray  # (k, 77) int32
    weights: np.ndarray  # (k, 77) float32
    token_count: int  # prompt tokens, without BOS/EOS/padding

    @property
    def count(self) -> int:
        return len(self.ids)


def chunk_prompt(text: str, tokenize: Callable[[list[str]], list[list[int]]], bos: int, eos: int, pad: int,
                 comma: int | None) -> PromptChunks:
    """A1111's ``tokenize_line`` + ``process_tokens`` padding rule, for one prompt."""
    parsed = parse_prompt_attention(text)
    rows: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def flush() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK_TOKENS - len(tokens)
        rows.append(([bos] + tokens + [eos] * fill + [eos], [1.0] + weights + [1.0] * fill + [1.0]))
        tokens, weights, last_comma = [], [], -1

    for ids, (fragment, weight) in zip(tokenize([t for t, _ in parsed]), parsed):
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            flush()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                # a full chunk with a comma near its end: what follows the comma starts the next chunk
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                flush()
                tokens, weights = moved, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                flush()
            tokens.append(token)
            weights.append(weight)
            count += 1
    if tokens or not rows:
        flush()
    ids = np.array([r for r, _ in rows], np.int32)  # (k, 77)
    if pad != eos:  # SD 2: after the first EOS, the pad token
        for row in ids:
            first = int(np.argmax(row == eos))
            row[first + 1:] = pad
    with np.errstate(over="ignore"):
        chunk_weights = np.array([w for _, w in rows], np.float32)  # (k, 77)
    if not np.isfinite(chunk_weights).all():  # deep nesting or a huge (word:w): A1111 would encode NaN
        raise UsageError("prompt: an emphasis weight is beyond float32 range (too many nested brackets or too "
                         "large a (word:weight)); use smaller weights")
    return PromptChunks(ids=ids, weights=chunk_weights, token_count=count)


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk (77, D): scale each token, keep the chunk's mean."""
    if np.all(weights == 1.0):
        return hidden
    with np.errstate(all="ignore"):  # a non-finite result is refused by the pipeline, with its cause
        original = hidden.mean(dtype=np.float64)
        scaled = hidden * weights[:, None]
        return (scaled * (original / scaled.mean(dtype=np.float64))).astype(np.float32)


def join_chunks(hidden: np.ndarray, prompts: list[PromptChunks], empty: np.ndarray | None) -> np.ndarray:
    """Encoder rows (R, 77, D) of ``prompts``' chunks, in order -> (P, 77 x k, D), every prompt padded to the most
    chunks with ``empty`` (the encoding of "", (77, D))."""
    k = max(p.count for p in prompts)
    out, row = [], 0
    for p in prompts:
        parts = [apply_emphasis(hidden[row + i].astype(np.float32), p.weights[i]) for i in range(p.count)]
        parts += [empty] * (k - p.count)
        out.append(np.concatenate(parts, axis=0))  # (77k, D)
        row += p.count
    return np.stack(out)  # (P, 77k, D)
