"""CLIP tokenizer from the engine folder, on Hugging Face ``tokenizers`` (Rust), without transformers.

Produces the ids transformers' ``CLIPTokenizer(..., padding="max_length", truncation=True)`` gives:
BOS, tokens, EOS, then the pad token, exactly ``max_length`` ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sdtrt.errors import ManifestError

log = logging.getLogger("sdtrt")


class ClipTokenizer:
    def __init__(self, folder: Path, max_length: int = 77):
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
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.max_length = int(min(config.get("model_max_length", max_length), max_length))
        pad = config.get("pad_token", "<|endoftext|>")
        pad = pad["content"] if isinstance(pad, dict) else pad
        self.pad_id = self._tok.token_to_id(pad)
        if self.pad_id is None:
            raise ManifestError(f"pad token {pad!r} of {config_file} is not in the vocabulary")
        self._tok.no_truncation()
        self._tok.no_padding()

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(ids (N, max_length) int32, tokens dropped per prompt by truncation)."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)  # (N, 77)
        dropped = []
        for row, encoding in enumerate(self._tok.encode_batch(list(prompts))):
            tokens = encoding.ids
            extra = max(0, len(tokens) - self.max_length)
            if extra:
                tokens = tokens[: self.max_length - 1] + tokens[-1:]  # keep EOS, as CLIP's truncation does
                log.warning("prompt %d is longer than %d tokens: %d tokens were dropped", row, self.max_length, extra)
            ids[row, : len(tokens)] = tokens
            dropped.append(extra)
        return ids, dropped
