"""Prompts as A1111 reads them: the parser against A1111's own documented examples, chunking against a reference
written here from A1111's rules (transformers' tokenizer, the real CLIP vocabulary where the registry has it), and
images against diffusers' StableDiffusionPipeline fed with embeddings the reference computed with the PyTorch text
encoder (long prompts, emphasis, BREAK, CLIP skip), on the mid-size model at a non-square size."""

import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.prompts import chunk_prompt, parse_prompt_attention
from sdtrt.runtime.request import GenerationRequest

# ---- the parser: A1111's docstring examples (modules/prompt_parser.py) ------------------------------------

A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, want", A1111_EXAMPLES)
def test_parser_gives_a1111s_documented_results(text, want):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


def test_break_unmatched_brackets_and_escapes():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt_attention("smile) and ]") == [("smile) and ]", 1.0)]  # unmatched closers are text
    assert parse_prompt_attention("x:1.5) y") == [("x:1.5) y", 1.0)]  # a weight without '(' is text
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("a\\\\b") == [("a\\b", 1.0)]


@pytest.mark.parametrize("text", ["(cat:1.2.3)", "(cat:.)", "(cat:-.)"])
def test_a_weight_that_is_not_a_number_is_one_clear_error(text):
    with pytest.raises(UsageError, match=r"prompt: the weight '.+' in '.+' is not a number"):
        parse_prompt_attention(text)


# ---- a reference implementation of A1111's rules, independent of runtime/prompts.py --------------------------

def ref_parse(text):
    """A character scanner (A1111 uses one regex): two bracket stacks, escapes, (x:w), BREAK, merged runs."""
    res, rounds, squares = [], [], []

    def scale(start, factor):
        for r in res[start:]:
            r[1] *= factor

    def plain(run):
        pieces = re.split(r"\s*\bBREAK\b\s*", run)
        for i, piece in enumerate(pieces):
            if i:
                res.append(["BREAK", -1.0])
            res.append([piece, 1.0])

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 < len(text) and text[i + 1] in "()[]\\":
                res.append([text[i + 1], 1.0])
                i += 2
            else:
                res.append(["", 1.0])
                i += 1
        elif c == "(":
            rounds.append(len(res))
            i += 1
        elif c == "[":
            squares.append(len(res))
            i += 1
        elif c == ":":
            m = re.match(r":([+-]?[.\d]+)\)", text[i:])
            if m and rounds:
                scale(rounds.pop(), float(m.group(1)))
            else:
                plain(m.group(0) if m else ":")
            i += len(m.group(0)) if m else 1
        elif c == ")":
            scale(rounds.pop(), 1.1) if rounds else plain(")")
            i += 1
        elif c == "]":
            scale(squares.pop(), 1 / 1.1) if squares else plain("]")
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in "\\()[]:":
                j += 1
            plain(text[i:j])
            i = j
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    res = res or [["", 1.0]]
    out = [res[0]]
    for r in res[1:]:
        if r[1] == out[-1][1]:
            out[-1][0] += r[0]
        else:
            out.append(r)
    return out


def ref_chunks(tokenizer, text):
    """A1111's tokenize_line + process_tokens with transformers' CLIPTokenizer: (ids (k, 77), weights (k, 77))."""
    parsed = ref_parse(text)
    tokenized = tokenizer([t for t, _ in parsed], add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    chunks, cur, mults, last_comma = [], [], [], -1

    def close():
        nonlocal cur, mults, last_comma
        n = 75 - len(cur)
        chunks.append(([bos] + cur + [eos] * n + [eos], [1.0] + mults + [1.0] * n + [1.0]))
        cur, mults, last_comma = [], [], -1

    for ids, (t, w) in zip(tokenized, parsed):
        if t == "BREAK" and w == -1:
            close()
            continue
        for tok in ids:
            if tok == comma:
                last_comma = len(cur)
            elif len(cur) == 75 and last_comma != -1 and len(cur) - last_comma <= 20:
                keep = last_comma + 1
                moved = (cur[keep:], mults[keep:])
                cur, mults = cur[:keep], mults[:keep]
                close()
                cur, mults = list(moved[0]), list(moved[1])
            if len(cur) == 75:
                close()
            cur.append(tok)
            mults.append(w)
    if cur or not chunks:
        close()
    ids = [list(c) for c, _ in chunks]
    if pad != eos:
        for row in ids:
            first = row.index(eos)
            row[first + 1:] = [pad] * (77 - first - 1)
    return np.array(ids), np.array([m for _, m in chunks], np.float32)


LONG = ", ".join(f"{w} {i}" for i, w in enumerate(("castle on a hill", "golden hour", "oil painting", "sharp focus",
                                                    "intricate details", "dramatic sky")) for _ in range(5)) + " end"
PROMPTS = [
    "a photo of an astronaut riding a horse",
    "a (red fox:1.3) in [the snow], ((sharp focus)), \\(literal\\)",
    LONG,
    "first part BREAK second part, (weighted BREAK inside) BREAK",
    " ".join(["word"] * 74) + ", tail words after a late comma that must move",
    "BREAK BREAK double",
    "",
]


def _check_chunking(tokenizer, ours):
    for text in PROMPTS:
        want_ids, want_w = ref_chunks(tokenizer, text)
        got = chunk_prompt(text, ours.fragments, ours.bos_id, ours.eos_id, ours.pad_id, ours.comma_id)
        np.testing.assert_array_equal(got.ids, want_ids, err_msg=text)
        np.testing.assert_allclose(got.weights, want_w, rtol=1e-12, err_msg=text)


def test_chunks_match_the_reference_on_the_builtin_vocabulary(small_model):
    from transformers import CLIPTokenizer

    from sdtrt.runtime.tokenizer import ClipTokenizer

    out, folder = small_model
    _check_chunking(CLIPTokenizer.from_pretrained(folder / "tokenizer"), ClipTokenizer(out / "tokenizer"))
    one = chunk_prompt(PROMPTS[0], *(lambda t: (t.fragments, t.bos_id, t.eos_id, t.pad_id, t.comma_id))(
        ClipTokenizer(out / "tokenizer")))
    plain = CLIPTokenizer.from_pretrained(folder / "tokenizer")(PROMPTS[0], padding="max_length", max_length=77)
    assert one.ids.tolist() == [plain["input_ids"]]  # one chunk: exactly the plain 77-token encoding


@pytest.fixture(scope="session")
def real_clip_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer on OpenAI's CLIP BPE vocabulary (49408 tokens), taken from the clip-anytorch
    wheel (not installed: it needs torchvision). Real words, real commas: chunk boundaries fall as in SD."""
    import gzip
    import json

    root = tmp_path_factory.mktemp("clip_vocab")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "clip-anytorch==2.6.0", "-d",
                           str(root)], capture_output=True, text=True)
    wheels = list(root.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot download clip-anytorch (no package registry?): {proc.stderr[-200:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        lines = gzip.decompress(z.read("clip/bpe_simple_vocab_16e6.txt.gz")).decode().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    from sdtrt.export.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = root / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    assert len(tok) == 49408
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD 1.x pads with EOS, SD 2.x with "!"
def test_chunks_match_the_reference_on_the_real_clip_vocabulary(real_clip_tokenizer, pad, tmp_path):
    from transformers import CLIPTokenizer

    from sdtrt.runtime.tokenizer import ClipTokenizer

    folder = tmp_path / "tok"
    CLIPTokenizer.from_pretrained(real_clip_tokenizer, pad_token=pad).save_pretrained(folder)
    theirs, ours = CLIPTokenizer.from_pretrained(folder), ClipTokenizer(folder)
    assert ours.comma_id == theirs.get_vocab()[",</w>"]
    _check_chunking(theirs, ours)
    long = chunk_prompt(LONG, ours.fragments, ours.bos_id, ours.eos_id, ours.pad_id, ours.comma_id)
    assert long.count == 2 and long.ids[0, -1] in (ours.eos_id, ours.pad_id)


# ---- images against diffusers fed with the reference's embeddings ---------------------------------------

def ref_embeddings(folder, texts, clip_skip):
    """The reference encoding of ``texts`` as A1111 computes it, with diffusers' clip_skip and the PyTorch encoder:
    (N, 77k, D), every text padded with the empty prompt's encoding to the most chunks."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    norm = getattr(encoder, "text_model", encoder).final_layer_norm

    def encode(ids, weights):
        with torch.no_grad():
            out = encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
            z = out.last_hidden_state if not clip_skip else norm(out.hidden_states[-(clip_skip + 1)])
            w = torch.from_numpy(weights)
            original = z.mean()
            z = z * w[..., None]
            return z * (original / z.mean())  # A1111 "Original" emphasis, one chunk

    empty = encode(*ref_chunks(tokenizer, ""))[0]
    encoded = []
    for text in texts:
        ids, weights = ref_chunks(tokenizer, text)
        encoded.append([encode(ids[i:i + 1], weights[i:i + 1])[0] for i in range(len(ids))])
    k = max(len(e) for e in encoded)
    return torch.stack([torch.cat(e + [empty] * (k - len(e))) for e in encoded])


MID = ", ".join(["a red fox in the snow"] * 7)  # about 100 tokens: two chunks, cut at a comma
CASES = {  # (prompts, negatives, clip_skip, chunks the longest text needs)
    "one chunk": (["a red fox in the snow"], ["blurry"], None, 1),
    "emphasis": (["a (red fox:1.3) in [the snow], ((sharp focus))"], ["(lowres:1.2), [blurry]"], None, 1),
    "two chunks, padded negative": ([MID], ["blurry"], None, 2),
    "three chunks, BREAK, two prompts": ([MID + " BREAK (moon:1.2)", "a dog"], ["", "ugly BREAK blurry"], None, 3),
    "clip skip 1": (["a (castle:1.2) on a hill, golden hour"], ["blurry"], 1, 1),
    "clip skip 2, long": ([MID], ["[blurry]"], 2, 2),
}


@pytest.mark.parametrize("case", CASES)
def test_image_matches_diffusers_given_the_a1111_embeddings(small_model, case):
    import diffusers

    out, folder = small_model
    prompts, negatives, clip_skip, chunks = CASES[case]
    steps, height, width, seed = 8, 128, 96, 11
    with Pipeline.from_dir(out, backend="onnxruntime-cpu") as pipe:
        kwargs = dict(num_inference_steps=steps, height=height, width=width, seed=seed, scheduler="dpmpp_2m",
                      clip_skip=clip_skip, output_type="np")
        request = GenerationRequest.create(prompts, negatives, steps, 7.5, height, width, seed, clip_skip=clip_skip)
        assert max(c.count for c in pipe.plan(request).chunks.values()) == chunks
        ours = pipe(prompts, negative_prompt=negatives, **kwargs).images
    from tests.runtime.test_pipeline import per_image_draws

    (latents,) = per_image_draws(seed, len(prompts), (4, height // 8, width // 8), 1)  # image i: PCG64(seed + i)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    embeds = ref_embeddings(folder, prompts + negatives, clip_skip)
    want = ref(prompt_embeds=embeds[:len(prompts)], negative_prompt_embeds=embeds[len(prompts):],
               num_inference_steps=steps, guidance_scale=7.5, height=height, width=width,
               latents=torch.from_numpy(latents), output_type="np").images
    assert psnr(ours, want) >= 40, f"{case}: PSNR {psnr(ours, want):.1f} dB"


def test_a1111_syntax_changes_the_image_and_one_chunk_is_unchanged(small_model):
    out, _ = small_model
    kwargs = dict(num_inference_steps=4, height=64, width=64, seed=3, scheduler="euler", output_type="np")
    with Pipeline.from_dir(out) as pipe:
        plain = pipe("a red fox", **kwargs).images
        weighted = pipe("a (red fox:1.5)", **kwargs).images
        neutral = pipe("a (red fox:1.0)", **kwargs).images
    np.testing.assert_array_equal(plain, neutral)
    assert psnr(plain, weighted) < 60
