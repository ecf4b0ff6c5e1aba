"""The runtime tokenizer (tokenizers only) against transformers' CLIPTokenizer on the same files."""

import logging

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


def test_the_truncation_warning_names_the_prompt_as_the_user_numbers_it(tiny_fp32, caplog):
    from sdtrt.runtime import Pipeline

    long = CORPUS[-1]
    with Pipeline.from_dir(tiny_fp32[0]) as pipe, caplog.at_level(logging.WARNING, logger="sdtrt"):
        pipe(["a cat", long], negative_prompt=[long, "blurry"], num_inference_steps=1, height=64, width=64, seed=1,
             scheduler="euler")
        messages = [r.getMessage() for r in caplog.records]
        caplog.clear()
        pipe(long, num_inference_steps=1, height=64, width=64, seed=1, scheduler="euler")
        single = [r.getMessage() for r in caplog.records]
    assert [m.split(" is longer")[0] for m in messages] == ["negative prompt 1", "prompt 2"]
    assert single and single[0].startswith("prompt is longer than 77 tokens: its last ")
