"""--from-png with the LoRAs and embeddings an image was made with (issue 22): the image records them as A1111 does
("Lora hashes", "TI hashes", the weights in prompt tags and sdtrt's "Lora weights"); a replay applies them (same
pixels) or refuses naming what is missing or is another file; never a silently different image. On the tiny model,
with LoRAs and embeddings written by `sdtrt make-lora` / `make-embedding`."""

import hashlib
import re

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdtrt.errors import UsageError
from sdtrt.runtime.infotext import parse_infotext, replay
from sdtrt.runtime.replay import resolve_loras
from tests.runtime.test_infotext import a1111_params

SETTINGS = ["--size", "64x64", "--steps", 3, "--seed", 11]


def a1111_lora_hash(path) -> str:
    """A1111's modules/hashes.py addnet_hash_safetensors (its LoRA hash for a .safetensors file), first 12."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(n + 8)
        return hashlib.sha256(f.read()).hexdigest()[:12]


def a1111_pairs(value: str) -> dict:
    """How A1111's Lora extension reads "Lora hashes" back (lora_script.py infotext_pasted)."""
    return {k.strip(): v.strip() for k, v in (x.strip().split(":", 1) for x in value.split(","))}


def pixels(path):
    return np.asarray(Image.open(path), np.int16)


def params(path) -> str:
    return Image.open(path).text["parameters"]


def _sdtrt(*argv):
    from sdtrt.cli import main

    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def engine(tiny_fp32):
    return tiny_fp32[0]  # read only: every test generates from it, none changes it


@pytest.fixture(scope="module")
def networks(engine, tmp_path_factory):
    """style (for --lora), char (in a --lora-dir, for a <lora:char:...> tag), the embedding mystyle; and, elsewhere,
    other files under the same names."""
    base = tmp_path_factory.mktemp("networks")
    made = {}
    for name, path, seed in [("style", base / "loras" / "style.safetensors", 1),
                             ("char", base / "ldir" / "char.safetensors", 2),
                             ("other style", base / "other" / "style.safetensors", 3),
                             ("other char", base / "otherdir" / "char.safetensors", 4)]:
        path.parent.mkdir()
        _sdtrt("make-lora", engine, path, "--rank", 2, "--seed", seed)
        made[name] = path
    for name, path, seed in [("mystyle", base / "emb" / "mystyle.safetensors", 1),
                             ("other mystyle", base / "otheremb" / "mystyle.safetensors", 2)]:
        path.parent.mkdir()
        _sdtrt("make-embedding", engine, path, "--seed", seed)
        made[name] = path
    return made


@pytest.fixture(scope="module")
def made(engine, networks, tmp_path_factory):
    """An image made with --lora style:0.8, a <lora:char:0.6> prompt tag (--lora-dir) and the embedding mystyle."""
    out = tmp_path_factory.mktemp("made") / "made.png"
    _sdtrt("generate", engine, "a cat, mystyle <lora:char:0.6>", "--lora", f"{networks['style']}:0.8", "--lora-dir",
           networks["char"].parent, "--embedding", networks["mystyle"], *SETTINGS, "-o", out)
    return out


def test_the_image_records_its_loras_and_embeddings_as_a1111_does(made, networks):
    p = a1111_params(params(made))
    # A1111's hashes: the LoRAs' tensor data (addnet hash), the embedding's whole file
    assert a1111_pairs(p["Lora hashes"]) == {"style": a1111_lora_hash(networks["style"]),
                                             "char": a1111_lora_hash(networks["char"])}
    assert a1111_pairs(p["TI hashes"]) == {
        "mystyle": hashlib.sha256(networks["mystyle"].read_bytes()).hexdigest()[:12]}
    assert p["Lora weights"] == "style: 0.8"  # the tagged LoRA's weight is in its tag, where A1111 reads it
    assert parse_infotext(params(made))["Prompt"] == "a cat, mystyle <lora:char:0.6>"


def test_a_replay_with_its_files_gives_the_same_pixels(cli, engine, tmp_path, made, networks):
    code, _, err = cli("generate", engine, "--from-png", made, "--lora", networks["style"], "--lora-dir",
                       networks["char"].parent, "--embedding", networks["mystyle"], "-o", tmp_path / "again.png")
    assert code == 0, err
    assert np.array_equal(pixels(again := tmp_path / "again.png"), pixels(made))
    assert params(again) == params(made)  # and it records the same, so it replays again
    # the LoRAs and the embedding matter: without them it is another image (the refusals below are not pedantry)
    code, _, err = cli("generate", engine, "a cat, mystyle", *SETTINGS, "-o", tmp_path / "plain.png")
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "plain.png") - pixels(made)).max() > 5
    # --lora-dir alone finds a --lora file by its name too
    code, _, err = cli("generate", engine, "--from-png", made, "--lora-dir", networks["style"].parent, "--lora",
                       networks["char"], "--embedding", networks["mystyle"], "-o", tmp_path / "dir.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "dir.png"), pixels(made))


def test_a_replay_without_them_is_refused_naming_each(cli, engine, tmp_path, made, networks):
    code, _, err = cli("generate", engine, "--from-png", made, "-o", tmp_path / "x.png")
    assert code == 2 and len(err.splitlines()) == 1, err
    style, char = a1111_lora_hash(networks["style"]), a1111_lora_hash(networks["char"])
    for needle in (f"LoRA style (hash {style}, weight 0.8), applied with --lora, which is not given",
                   f"LoRA char (hash {char}, weight 0.6), named by its prompt tag, which is not given",
                   "embedding mystyle (hash ", "which is not loaded"):
        assert needle in err, err
    assert not (tmp_path / "x.png").exists()
    # one missing is named alone
    code, _, err = cli("generate", engine, "--from-png", made, "--lora", networks["style"], "--embedding",
                       networks["mystyle"], "-o", tmp_path / "x.png")
    assert code == 2 and "LoRA char" in err and "style" not in err and "mystyle" not in err, err


@pytest.mark.parametrize("swap", ["style", "char", "mystyle"])
def test_another_file_under_the_same_name_is_refused(cli, engine, tmp_path, made, networks, swap):
    files = {"style": networks["style"], "char": networks["char"], "mystyle": networks["mystyle"]}
    files[swap] = networks[f"other {swap}"]
    code, _, err = cli("generate", engine, "--from-png", made, "--lora", files["style"], "--lora-dir",
                       files["char"].parent, "--embedding", files["mystyle"], "-o", tmp_path / "x.png")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(rf"{'LoRA' if swap != 'mystyle' else 'embedding'} {swap} of hash \w+, but \S*{swap}"
                     r"\.safetensors is another file", err), err
    assert not (tmp_path / "x.png").exists()


def test_flags_that_replace_a_prompt_drop_its_tags_and_keep_the_rest(cli, engine, tmp_path, made, networks):
    # a new prompt: <lora:char> and mystyle went with the old one; --lora style did not
    code, _, err = cli("generate", engine, "--from-png", made, "a dog", "-o", tmp_path / "x.png")
    assert code == 2 and "LoRA style" in err and "char" not in err and "mystyle" not in err, err
    code, _, err = cli("generate", engine, "--from-png", made, "a dog", "--lora", networks["style"],
                       "-o", tmp_path / "x.png")
    assert code == 0, err
    code, _, err = cli("generate", engine, "a dog", "--lora", f"{networks['style']}:0.8", *SETTINGS,
                       "-o", tmp_path / "y.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "x.png"), pixels(tmp_path / "y.png"))
    # a weight given with the file replaces the recorded one
    code, _, err = cli("generate", engine, "--from-png", made, "a dog", "--lora", f"{networks['style']}:0.3",
                       "-o", tmp_path / "z.png")
    assert code == 0, err
    assert not np.array_equal(pixels(tmp_path / "z.png"), pixels(tmp_path / "y.png"))


def _with_parameters(src, dst, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.open(src).save(dst, pnginfo=info)


def test_an_a1111_image_with_a_lora_tag_replays_with_that_file(cli, engine, tmp_path, networks):
    char = networks["char"]
    text = (f"a cat <lora:char:0.7>\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 5, "
            f'Size: 64x64, Model hash: 0123456789, Lora hashes: "char: {a1111_lora_hash(char)}", Version: v1.10.1')
    Image.new("RGB", (64, 64)).save(tmp_path / "blank.png")
    _with_parameters(tmp_path / "blank.png", tmp_path / "a1111.png", text)
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "a1111.png", "--lora-dir", char.parent,
                       "-o", tmp_path / "replay.png")
    assert code == 0, err
    code, _, err = cli("generate", engine, "a cat <lora:char:0.7>", "-n", "blurry", "--scheduler", "euler_a",
                       "--cfg", 7, "--seed", 5, "--size", "64x64", "--steps", 3, "--lora-dir", char.parent,
                       "-o", tmp_path / "direct.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "replay.png"), pixels(tmp_path / "direct.png"))
    # the same name in another folder is another file: refused, not replayed without the LoRA or with the wrong one
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "a1111.png", "--lora-dir",
                       networks["other char"].parent, "-o", tmp_path / "x.png")
    assert code == 2 and "LoRA char of hash" in err and "is another file" in err, err


def test_an_older_sdtrt_image_asks_for_the_weight_it_did_not_record(cli, engine, tmp_path, networks):
    style = networks["style"]
    full = hashlib.sha256(style.read_bytes()).hexdigest()[:12]  # what sdtrt wrote before A1111's hash
    text = f'a cat\nSteps: 3, Sampler: PLMS, CFG scale: 7.5, Seed: 11, Size: 64x64, Lora hashes: "style: {full}"'
    Image.new("RGB", (64, 64)).save(tmp_path / "blank.png")
    _with_parameters(tmp_path / "blank.png", tmp_path / "old.png", text)
    for given, needle in [((), "LoRA style (hash "), ((style,), "without a recorded weight")]:
        code, _, err = cli("generate", engine, "--from-png", tmp_path / "old.png",
                           *[x for g in given for x in ("--lora", g)], "-o", tmp_path / "x.png")
        assert code == 2 and needle in err and "WEIGHT" in err, err
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "old.png", "--lora", f"{style}:0.8",
                       "-o", tmp_path / "old-replay.png")
    assert code == 0, err
    code, _, err = cli("generate", engine, "a cat", "--lora", f"{style}:0.8", "--scheduler", "pndm", *SETTINGS,
                       "-o", tmp_path / "direct.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "old-replay.png"), pixels(tmp_path / "direct.png"))


def test_a_lora_the_folder_fused_is_not_applied_again(networks):
    style = networks["style"]
    h = a1111_lora_hash(style)
    r = replay(f'a cat\nSteps: 3, Seed: 1, Size: 64x64, Lora hashes: "style: {h}"')
    assert resolve_loras(r, fused=(f"style:0.8:{h}",)).loras == ()
    with pytest.raises(UsageError, match="LoRA style .* fused into its model at export"):
        resolve_loras(r, fused=(f"style:0.8:{'0' * 12}",))  # fused here, but another file


def test_a1111s_metadata_hash_and_a_renamed_file_are_found(networks, tmp_path):
    """A1111 prefers a LoRA's own claim (kohya's sshs_model_hash metadata) to hashing it; a file under another name
    is found by its hash among the --lora files given, as A1111 finds one among its LoRA folder's."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(networks["char"]))
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata={"sshs_model_hash": "ab" * 32})
    r = replay('a cat <lora:kohya:0.5>\nSteps: 3, Seed: 1, Size: 64x64, Lora hashes: "kohya: abababababab"')
    assert resolve_loras(r, given=[str(tmp_path / "kohya.safetensors")]).files == {
        "kohya": str(tmp_path / "kohya.safetensors")}
    r = replay(f'a cat <lora:char:0.5>\nSteps: 3, Seed: 1, Size: 64x64, Lora hashes: "char: '
               f'{a1111_lora_hash(networks["char"])}"')
    renamed = tmp_path / "my-char-v2.safetensors"
    renamed.write_bytes(networks["char"].read_bytes())
    assert resolve_loras(r, given=[str(renamed)]).files == {"char": str(renamed)}
    with pytest.raises(UsageError, match="LoRA char .* named by its prompt tag, which is not given"):
        resolve_loras(r, given=[str(networks["style"])])  # neither its name nor its hash


def test_a_lora_given_with_lora_and_tagged_in_the_prompt_replays_from_the_one_file(cli, engine, tmp_path, networks):
    """One file, both as --lora FILE:0.5 and as <lora:style:0.7> (two "Lora hashes" entries): the replay's --lora
    FILE serves both."""
    style = networks["style"]
    code, _, err = cli("generate", engine, "a cat <lora:style:0.7>", "--lora", f"{style}:0.5", "--lora-dir",
                       style.parent, *SETTINGS, "-o", tmp_path / "both.png")
    assert code == 0, err
    assert a1111_params(params(tmp_path / "both.png"))["Lora weights"] == "style: 0.5"
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "both.png", "--lora", style,
                       "-o", tmp_path / "again.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "both.png"))
