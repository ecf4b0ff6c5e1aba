"""PNG parameters in A1111's format: what sdtrt writes parses with A1111's own rules, an A1111 infotext replays,
and --from-png reproduces an image bit for bit on the same backend."""

import json
import re

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdtrt.errors import UsageError
from sdtrt.runtime.infotext import create_infotext, parse_infotext, replay

# A1111's modules/infotext_utils.py, re_param_code and unquote: the format's own reader
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_params(text):
    last = text.strip().split("\n")[-1]
    return {k: (json.loads(v) if v[:1] == '"' and v[-1:] == '"' else v) for k, v in A1111_PARAM.findall(last)}


A1111_DOC = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse \
Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, \
mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""


def test_an_a1111_infotext_replays_as_sdtrt_settings():
    r = replay(A1111_DOC)
    assert r.prompt.startswith("girl with an artist's beret") and r.negative_prompt.endswith("messy drawing")
    assert (r.steps, r.scheduler, r.cfg, r.seed, r.width, r.height, r.clip_skip) == (20, "euler_a", 7.0, 965400086,
                                                                                       512, 512, 1)
    karras = replay("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert karras.scheduler == "dpmpp_2m_karras" and not karras.karras
    legacy = replay("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64, Clip skip: 2")
    assert legacy.scheduler == "dpmpp_2m_karras" and legacy.clip_skip == 2
    # A1111's schedule types by label onto sdtrt's sampler + schedule (infotext.A1111_SCHEDULERS)
    for sampler, schedule, ours in [("Euler", "Karras", "euler_karras"), ("UniPC", "Exponential", "unipc_exponential"),
                                    ("Euler a", "SGM Uniform", "euler_a_trailing"), ("DDIM", "Normal", "ddim_linspace"),
                                    ("LMS Karras", None, "lms_karras"), ("Euler", "Automatic", "euler")]:
        text = f"a cat\nSteps: 9, Sampler: {sampler}, " + (f"Schedule type: {schedule}, " if schedule else "") + \
            "Seed: 3, Size: 8x8"
        assert replay(text).scheduler == ours, text
    for schedule, needle in [("Karras", "'Euler a' has no schedule type 'Karras'"), ("Beta", "not available in sdtrt"),
                             ("Wobbly", "which sdtrt does not know")]:
        with pytest.raises(UsageError, match=needle):
            replay(f"a cat\nSteps: 9, Sampler: Euler a, Schedule type: {schedule}, Seed: 3, Size: 8x8")


def test_a_random_seed_replays_exactly():
    # older sdtrt's random seeds went up to 2^63 and PCG64 takes 2^64 - 1: a float keeps only 53 bits of them
    for seed in (2**63 - 1, 9041893916955697666, 2**64 - 1):
        assert replay(f"a cat\nSteps: 4, Seed: {seed}, Size: 64x64").seed == seed


def test_values_that_need_quoting_are_quoted_as_a1111_quotes_them():
    text = create_infotext("line one\nline two", "", {"Steps": 3, "Model": "a, b: c", "Note": 'say "hi"',
                                                      "Empty": None})
    assert "Negative prompt" not in text and "Empty" not in text
    assert a1111_params(text) == {"Steps": "3", "Model": "a, b: c", "Note": 'say "hi"'}
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two" and parsed["Model"] == "a, b: c"


def a1111_parse(x: str) -> tuple[str, str]:
    """(prompt, negative prompt) as A1111's parse_generation_parameters (modules/infotext_utils.py) reads them."""
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    return prompt, negative_prompt


@pytest.mark.parametrize("prompt, negative", [
    ("Negative prompt: a cat", ""),  # the whole prompt imitates the marker
    ("a cat\nNegative prompt: a dog", "blurry"),
    ("a cat\n   Negative prompt: a dog\n(sharp:1.2)", "blurry\nNegative prompt: worse\nugly"),
    ("a cat", "Negative prompt: twice"),
    ("a cat\nNegative prompt:", "x\nNegative prompt:\nNegative prompt: y"),
    ("(a cat:1.1)\nNegative prompt: [dog]\nSteps: 3, Sampler: Euler, Seed: 1", ""),  # and a settings line
])
def test_a_prompt_imitating_the_negative_prompt_marker_round_trips(prompt, negative):
    from sdtrt.runtime.prompts import parse_prompt_attention

    text = create_infotext(prompt, negative, {"Steps": 3, "Sampler": "Euler", "CFG scale": 7, "Seed": 1})
    parsed = parse_infotext(text)
    lines = lambda s: "\n".join(line.strip() for line in s.split("\n"))  # noqa: E731  (A1111 strips each line)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == (lines(prompt), lines(negative))
    assert parsed["Steps"] == "3" and parsed["Seed"] == "1"
    # A1111 reads the escaped lines with their backslash, which its prompt parser drops: the same conditioning
    theirs = a1111_parse(text)
    for ours, read in zip((prompt, negative), theirs):
        assert parse_prompt_attention(read) == parse_prompt_attention(lines(ours)), (ours, read)
    assert a1111_params(text)["Seed"] == "1"


@pytest.mark.parametrize("text, needle", [
    ("a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1", "the sampler 'DPM++ SDE', which sdtrt does not have"),
    ("a cat\nSteps: 20, Sampler: Euler, Schedule type: Align Your Steps, Seed: 1", "schedule type 'Align Your Steps'"),
    ("a cat\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1", "Steps: 'many', not a number"),
    # a caption someone else put in the chunk is not a generation to replay (it would run as a prompt with defaults)
    ("\x00\x01 garbage \xff", "holds no generation settings (no 'Steps: ...' in a last line"),
    ("a cat, by someone\nSampler: Euler, Seed: 3, Size: 64x64", "holds no generation settings"),
    # issue 22: settings alone are a prompt to A1111's reader (fewer than 3 on the last line); sizes it cannot read
    ("Steps: 3", "holds no generation settings"),
    ("Steps: 3, Seed: 5", "holds no generation settings"),
    ("a cat\nSteps: 3, Seed: 1, Size: 0x0", "Size: 0x0: width and height must be positive"),
    ("a cat\nSteps: 3, Seed: 1, Size: 64x0", "Size: 64x0: width and height must be positive"),
    ("a cat\nSteps: 3, Seed: 1, Size: -5x3", "Size: '-5x3', not WIDTHxHEIGHT"),
    ("a cat\nSteps: 3, Seed: 1, Size: 64x64x2", "Size: '64x64x2', not WIDTHxHEIGHT"),
    ("a cat\nSteps: 3, Seed: 1, Size: 1e3x64", "Size: '1e3x64', not WIDTHxHEIGHT"),
    ("a cat\nSteps: 3, Seed: 1e400, Size: 64x64", "Seed: '1e400', not a number"),
    ("a cat\nSteps: 3, Seed: 1, Size: 64x64, CFG scale: nan", "CFG scale: 'nan', not a finite number"),
    ("a cat\nSteps: 3, Seed: 1, Size: 64x64, CFG scale: 1e999", "CFG scale: '1e999', not a finite number"),
    # the LoRAs and embeddings it was made with, as A1111 lists them: a list that is not one is not skipped
    ('a cat\nSteps: 3, Seed: 1, Size: 64x64, Lora hashes: "style"', "Lora hashes: 'style', not a list of 'name: hash'"),
    ('a cat\nSteps: 3, Seed: 1, Size: 64x64, Lora hashes: "style: zz"', "not a list of 'name: hash'"),
    ('a cat\nSteps: 3, Seed: 1, Size: 64x64, TI hashes: ": 0123456789ab"', "TI hashes: ': 0123456789ab', not a"),
    ('a cat\nSteps: 3, Seed: 1, Size: 64x64, Lora weights: "style: inf"', "not a list of 'name: weight'"),
])
def test_parameters_sdtrt_cannot_replay_are_refused_by_name(text, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        replay(text)


def test_from_png_reproduces_the_image_bit_for_bit(engine, cli, tmp_path):
    # image 2 of a batch of 3 (A1111's seeds: seed 5 + 2), replayed alone from its PNG, with a sampler that draws
    # noise at every step
    code, _, err = cli("generate", engine, "a (red:1.2) fox, BREAK snow", "-n", "blurry, (ugly:1.3)", "--size", "96x64",
                       "--steps", 4, "--seed", 5, "--clip-skip", 2, "--num-images", 3, "--scheduler", "euler_a",
                       "-o", tmp_path / "a.png")
    assert code == 0, err
    original = Image.open(tmp_path / "a-0003.png")
    params = a1111_params(original.text["parameters"])
    assert params["Sampler"] == "Euler a" and params["Clip skip"] == "2" and params["Seed"] == "7"
    assert params["Size"] == "96x64" and "Batch size" not in params and "Batch pos" not in params  # as A1111 1.6+
    assert re.fullmatch(r"[0-9a-f]{10}", params["Model hash"]) and params["Version"] == "sdtrt 0.1.0"
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "a-0003.png", "-o", tmp_path / "b.png")
    assert code == 0, err
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "b.png")), np.array(original))
    assert Image.open(tmp_path / "b.png").text["parameters"] == original.text["parameters"]
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "a-0002.png", "--scheduler", "dpmpp_2m_karras",
                       "-o", tmp_path / "k.png")
    assert code == 0, err
    params = a1111_params(Image.open(tmp_path / "k.png").text["parameters"])
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras" and params["Seed"] == "6"


def test_an_image_of_an_older_sdtrt_batch_is_refused_by_name_and_an_a1111_one_replays_alone(engine, cli, tmp_path):
    # A1111 before 1.6 (create_infotext: "Batch size": None if p.batch_size < 2 else p.batch_size, "Batch pos": ...)
    # wrote each image's own seed (all_seeds[index]) beside its place: the seed alone regenerates it
    a1111 = replay("a cat\nSteps: 2, Sampler: Euler, Seed: 12, Size: 64x64, Batch size: 3, Batch pos: 2")
    assert a1111.seed == 12 and a1111.shared_batch is None
    # an older sdtrt's batch shared one generator: its Seed does not regenerate image 2, and replaying it would make
    # another image silently
    text = "a cat\nSteps: 2, Sampler: Euler, Seed: 10, Size: 64x64, Batch size: 3, Batch pos: 2, Version: sdtrt 0.1.0"
    assert replay(text).shared_batch == "Batch pos: 2 of Batch size: 3"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(tmp_path / "old.png", pnginfo=info)
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "old.png", "-o", tmp_path / "x.png")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds Batch pos: 2 of Batch size: 3: an older sdtrt made it in a batch that shared one generator" in err
    assert not (tmp_path / "x.png").exists()


def test_from_png_replays_an_a1111_image(engine, cli, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_DOC.replace("Size: 512x512", "Size: 64x64"))
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "a1111.png", "--steps", 2, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "the image was made with model hash 45dee52b" in err  # a different model: said, not hidden
    params = a1111_params(Image.open(tmp_path / "x.png").text["parameters"])
    assert (params["Sampler"], params["CFG scale"], params["Seed"], params["Steps"]) == ("Euler a", "7", "965400086", "2")


@pytest.mark.parametrize("make, needle", [
    (lambda p: Image.new("RGB", (8, 8)).save(p), "holds no generation parameters"),
    (lambda p: p.write_bytes(b"not an image"), "is not a readable image"),
    (lambda p: None, "does not exist"),
])
def test_from_png_bad_input(engine, cli, tmp_path, make, needle):
    make(tmp_path / "in.png")
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "in.png", "-o", tmp_path / "x.png")
    assert code == 2 and err.startswith("sdtrt generate: error: ") and needle in err and len(err.splitlines()) == 1


def test_no_prompt_and_no_png_is_one_line(engine, cli, tmp_path):
    code, _, err = cli("generate", engine, "-o", tmp_path / "x.png")
    assert code == 2 and err == "sdtrt generate: error: a prompt is needed (or --from-png IMAGE)"


def test_parameters_are_read_wherever_a1111_reads_them(tmp_path):
    """A1111's read_info_from_image: the PNG 'parameters' chunk (tEXt, zTXt, iTXt; before or after the image data),
    an EXIF UserComment over it (JPEG and WebP as A1111 writes them: piexif.insert), else a comment (A1111 saves
    GIFs with comment=infotext; a JPEG's COM segment)."""
    import zlib

    import piexif
    import piexif.helper

    from sdtrt.runtime.infotext import read_parameters

    text = "a fox, (fog:1.2)\nNegative prompt: blur\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 8x8"
    image = Image.new("RGB", (8, 8), "red")
    for name, zip_ in (("tEXt", False), ("zTXt", True), ("iTXt", True)):
        info = PngImagePlugin.PngInfo()
        (info.add_itxt if name == "iTXt" else info.add_text)("parameters", text, zip=zip_)
        image.save(tmp_path / f"{name}.png", pnginfo=info)
    plain = tmp_path / "plain.png"
    image.save(plain)
    data = plain.read_bytes()  # a tEXt chunk after the image data, before IEND (as some tools append it)
    body = b"parameters\0" + text.encode("latin-1")
    chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    (tmp_path / "after.png").write_bytes(data[:-12] + chunk + data[-12:])
    for suffix, fmt in ((".jpg", "JPEG"), (".webp", "WEBP")):
        image.save(tmp_path / f"a1111{suffix}", format=fmt)
        exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, encoding="unicode")}})
        piexif.insert(exif, str(tmp_path / f"a1111{suffix}"))
    image.save(tmp_path / "a1111.gif", comment=text)
    image.save(tmp_path / "com.jpg", comment=text.encode())
    for name in ("tEXt.png", "zTXt.png", "iTXt.png", "after.png", "a1111.jpg", "a1111.webp", "a1111.gif", "com.jpg"):
        assert read_parameters(tmp_path / name) == text, name
    # a comment and EXIF: the EXIF UserComment, as in A1111
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\0\0\0" + text.encode()
    image.save(tmp_path / "both.jpg", comment=b"stale\nSteps: 1, Seed: 1, Size: 8x8", exif=exif)
    assert read_parameters(tmp_path / "both.jpg") == text
