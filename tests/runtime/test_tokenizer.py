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
