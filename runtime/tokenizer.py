"""CLIP tokenizer from the engine folder, on Hugging Face ``tokenizers`` (Rust), without transformers.

``__call__`` produces the ids transformers' ``CLIPTokenizer(..., padding="max_length", truncation=True)``
gives: BOS, tokens, EOS, then the pad token, exactly ``max_length`` ids. ``fragments`` gives the ids of
``CLIPTokenizer(texts, add_special_tokens=False)``, which A1111's long-prompt rule chunks itself
(``runtime/prompts.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdtrt.errors import ManifestError


class ClipTokenizer:
    def __init__(self, folder: Path, max_length: int = 77, vocab_size: int | None = None):
        """``vocab_size``: the text encoder's token embeddings (``manifest.model.vocab_size``); a token id at or
        beyond it is refused here, at load, instead of failing inside the text encoder at the first prompt."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ManifestError(f"tokenizer not found: {path}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as ex:  # the Rust side raises a plain Exception on malformed files
            raise ManifestError(f"cannot read {path}: {ex}") from None
        config_file = folder / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except (OSError, ValueError) as ex:
            raise ManifestError(f"cannot read {config_file}: {ex}") from None
        if not isinstance(config, dict):
            raise ManifestError(f"{config_file} does not hold a JSON object")
        limit = config.get("model_max_length", max_length)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 3:
            raise ManifestError(f"{config_file}: model_max_length must be a number of tokens, got {limit!r}")
        self.max_length = int(min(limit, max_length))
        pad = config.get("pad_token", "<|endoftext|>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if not isinstance(pad, str):
            raise ManifestError(f"{config_file}: pad_token must be a token, got {pad!r}")
        self.pad_id = self._tok.token_to_id(pad)
        if self.pad_id is None:
            raise ManifestError(f"pad token {pad!r} of {config_file} is not in the vocabulary")
        self.bos_id, self.eos_id = (self._special(config, key, default, config_file) for key, default in
                                    (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>")))
        self.comma_id = self._tok.token_to_id(",</w>")  # where A1111 may cut a long prompt
        if vocab_size is not None:
            token, ident = max(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            if ident >= vocab_size:
                raise ManifestError(f"{path}: token {token!r} has id {ident}, beyond the text encoder's {vocab_size} "
                                    f"embeddings (ids 0..{vocab_size - 1}): the tokenizer is not the exported "
                                    "model's; re-export the model")
        self._tok.no_truncation()
        self._tok.no_padding()

    def _special(self, config: dict, key: str, default: str, config_file: Path) -> int:
        token = config.get(key, default)
        token = token.get("content") if isinstance(token, dict) else token
        ident = self._tok.token_to_id(token) if isinstance(token, str) else None
        if ident is None:
            raise ManifestError(f"{key} {token!r} of {config_file} is not in the vocabulary")
        return ident

    def add_tokens(self, tokens: list[str], vocab_size: int) -> list[int]:
        """Add textual-inversion tokens as transformers' ``add_tokens`` does (matched in the normalised text), at ids
        ``vocab_size``, ``vocab_size`` + 1, ...; returns their ids."""
        from tokenizers import AddedToken

        self.check_new_tokens(tokens, vocab_size)
        self._tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=True)
                              for t in tokens])
        return [self._tok.token_to_id(t) for t in tokens]

    def check_new_tokens(self, tokens: list[str], vocab_size: int) -> None:
        """What ``add_tokens`` refuses (ManifestError), checked without adding anything."""
        taken = [t for t in tokens if self._tok.token_to_id(t) is not None]
        if taken:
            raise ManifestError(f"token {taken[0]!r} is already in the vocabulary: load the embedding under another "
                                "name")
        start = self._tok.get_vocab_size(with_added_tokens=True)
        if start != vocab_size:
            raise ManifestError(f"the tokenizer has {start} tokens, the text encoder {vocab_size}: new tokens would "
                                "not get their own rows")

    def fragments(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS and without truncation."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(ids (N, max_length) int32, tokens dropped per prompt by truncation)."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)  # (N, 77)
        dropped = []
        for row, encoding in enumerate(self._tok.encode_batch(list(prompts))):
            tokens = encoding.ids
            extra = max(0, len(tokens) - self.max_length)
            if extra:  # the caller warns, naming the prompt as the user numbers it
                tokens = tokens[: self.max_length - 1] + tokens[-1:]  # keep EOS, as CLIP's truncation does
            ids[row, : len(tokens)] = tokens
            dropped.append(extra)
        return ids, dropped
