"""The runtime tokenizer (tokenizers only) against transformers' CLIPTokenizer on the same files."""


import numpy as np
import pytest

from sdtrt.runtime.tokenizer import ClipTokenizer

CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "Ünïcödé façade — naïve café, 東京タワー at night 🌃🚀",
    "punctuation!!! (brackets) [more], {braces}; 'quotes' \"double\" a-b_c/d\\e",
    "   leading and    repeated   whitespace\tand\ttabs\n",
    "CAPITALS and MiXeD case, numbers 1234567890 and 3.14159",
    "it's, we're, they've, I'm, you'll, he'd",
    " ".join(["masterpiece"] * 40 + ["octane render"] * 20),  # well over 77 tokens
]


@pytest.fixture(scope="module")
def tokenizers(tiny_fp32):
    from transformers import CLIPTokenizer

    out, manifest = tiny_fp32
    return ClipTokenizer(out / manifest.tokenizer_dir), CLIPTokenizer.from_pretrained(out / manifest.tokenizer_dir)


def test_ids_match_transformers_clip_tokenizer(tokenizers):
    ours, theirs = tokenizers
    got, _ = ours(CORPUS)
    want = theirs(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and got.shape == (len(CORPUS), 77)


def test_long_prompt_is_truncated_and_the_dropped_tokens_counted(tokenizers):
    ours, theirs = tokenizers
    full = len(theirs(CORPUS[-1])["input_ids"])
    _, dropped = ours(CORPUS)
    assert dropped[-1] == full - 77 > 0
    assert dropped[:-1] == [0] * (len(CORPUS) - 1)


def test_a_prompt_longer_than_the_export_allows_is_refused_naming_the_prompt(tiny_fp32):
    from sdtrt.errors import UsageError
    from sdtrt.runtime import Pipeline

    long = " ".join(["castle"] * 300)  # 4+ chunks; the export allows 3
    with Pipeline.from_dir(tiny_fp32[0]) as pipe:
        with pytest.raises(UsageError, match=r"^negative prompt 1 needs \d chunks of 75 tokens \(\d+ tokens\); this "
                                             r"folder was exported for at most 3 \(re-export with --max-chunks \d\)"):
            pipe(["a cat", "a dog"], negative_prompt=[long, ""], num_inference_steps=1, height=64, width=64,
                 scheduler="euler")
        with pytest.raises(UsageError, match=r"^prompt needs"):
            pipe(long, num_inference_steps=1, height=64, width=64, scheduler="euler")


def test_a_tokenizer_with_ids_beyond_the_text_encoders_vocabulary_is_refused_at_load(tiny_fp32, tmp_path):
    import json
    import re
    import shutil

    from sdtrt.errors import ManifestError

    out, manifest = tiny_fp32
    folder = tmp_path / "tokenizer"
    shutil.copytree(out / manifest.tokenizer_dir, folder)
    vocab = manifest.model.vocab_size
    ClipTokenizer(folder, vocab_size=vocab)  # the exported one fits
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 99999, "content": "ZZTOK", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(data))
    path = re.escape(str(folder / "tokenizer.json"))
    with pytest.raises(ManifestError, match=rf"^{path}: token 'ZZTOK' has id \d+, beyond the text encoder's {vocab} "
                                            rf"embeddings \(ids 0..{vocab - 1}\): "):
        ClipTokenizer(folder, vocab_size=vocab)
