"""An engine folder is not trusted further than it must be (sdtrt/manifest_check.py): every file its manifest
names lies inside it (no absolute path, no ``..``, no symlink out, also in the tokenizer's and scheduler's
folders), and every number is sane. Each case is one line from every command that reads the folder."""

import json
import shutil

import pytest

from sdtrt.errors import ManifestError
from sdtrt.manifest import Manifest
from tests.test_bad_input import one_line

TRT = {"version": "10.16.1.11", "gpu": "H100", "compute_capability": "90",
       "engines": {"unet": {"file": "unet.plan", "sha256": "0" * 64, "size_bytes": 1, "profile": {}}}}


def _edit(engine, edit):
    data = json.loads((engine / "manifest.json").read_text())
    edit(data)
    (engine / "manifest.json").write_text(json.dumps(data))


def _outside(engine, name):
    """Move ``name`` out of the folder and leave a symlink to it: the same bytes, so only where it lies is wrong."""
    target = engine.parent / ("outside-" + name.replace("/", "-"))
    shutil.move(engine / name, target)
    (engine / name).symlink_to(target)


def _trt(engine, **engine_fields):
    _edit(engine, lambda d: d.update(tensorrt={**TRT, "engines": {"unet": {**TRT["engines"]["unet"], **engine_fields}}}))


ESCAPES = {
    "tokenizer_dir absolute": (lambda e: _edit(e, lambda d: d.update(tokenizer_dir="/etc")), "tokenizer_dir = '/etc'"),
    "tokenizer_dir ..": (lambda e: _edit(e, lambda d: d.update(tokenizer_dir="../../..")), "tokenizer_dir = '../../..'"),
    "scheduler_config absolute": (lambda e: _edit(e, lambda d: d.update(scheduler_config="/etc/passwd")),
                                  "scheduler_config = '/etc/passwd'"),
    "scheduler_config ..": (lambda e: _edit(e, lambda d: d.update(scheduler_config="scheduler/../../s.json")),
                            "scheduler_config = 'scheduler/../../s.json'"),
    "graph absolute": (lambda e: _edit(e, lambda d: d["components"]["unet"].update(file="/etc/passwd")),
                       "unet file '/etc/passwd'"),
    "external data ..": (lambda e: _edit(e, lambda d: d["components"]["unet"].update(
        external_data=["../unet.onnx.data"])), "unet file '../unet.onnx.data'"),
    "graph symlinked out": (lambda e: _outside(e, "vae_decoder.onnx"), "vae_decoder file 'vae_decoder.onnx' leads "
                                                                       "outside the engine folder"),
    "external data symlinked out": (lambda e: _outside(e, "unet.onnx.data"), "unet file 'unet.onnx.data' leads outside"),
    "tokenizer folder symlinked out": (lambda e: _outside(e, "tokenizer"), "tokenizer_dir 'tokenizer' leads outside"),
    "tokenizer file symlinked out": (lambda e: _outside(e, "tokenizer/tokenizer.json"),
                                     "tokenizer/ 'tokenizer/tokenizer.json' leads outside"),
    "scheduler config symlinked out": (lambda e: _outside(e, "scheduler/scheduler_config.json"),
                                       "scheduler_config 'scheduler/scheduler_config.json' leads outside"),
    "manifest symlinked out": (lambda e: _outside(e, "manifest.json"), "manifest.json 'manifest.json' leads outside"),
    "engine ..": (lambda e: _trt(e, file="../../unet.plan"), "unet engine file '../../unet.plan'"),
    "engine symlinked out": (lambda e: (_trt(e), (e / "unet.plan").symlink_to("/etc/passwd")),
                             "unet engine 'unet.plan' leads outside the engine folder (to /etc/passwd)"),
    "timing cache ..": (lambda e: _edit(e, lambda d: d.update(tensorrt={**TRT, "timing_cache": "../../etc/passwd"})),
                        "tensorrt.timing_cache '../../etc/passwd' leads outside"),
    "weight in another file": (lambda e: _edit(e, lambda d: d["components"]["unet"]["weights"]["conv_in"].update(
        file="../../etc/passwd")), "unet weight conv_in is in '../../etc/passwd', not one of the graph's external"),
}


def _all_commands_refuse(cli, engine, tmp_path, needle):
    with pytest.raises(ManifestError, match="manifest.json") as ex:
        Manifest.load(engine)
    assert needle in str(ex.value)
    for argv in (["info", engine], ["info", engine, "--verify"], ["build", engine],
                 ["generate", engine, "a cat", "--size", "64x64", "--steps", "1", "-o", tmp_path / "x.png"]):
        code, _, err = cli(*argv)
        one_line(code, err, argv[0], needle)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case", ESCAPES)
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(cli, engine, tmp_path, case):
    breakage, needle = ESCAPES[case]
    breakage(engine)
    _all_commands_refuse(cli, engine, tmp_path, needle)


def test_an_absolute_timing_cache_of_an_older_build_still_loads(engine):
    """Builds before issue 22 recorded the cache's absolute path (a record: nothing opens the cache through it), which
    points elsewhere once the folder is moved or mounted under another path; such a folder must keep loading."""
    _edit(engine, lambda d: d.update(tensorrt={**TRT, "timing_cache": "/old/mount/sd15/timing.trt10.sm89.cache"}))
    assert Manifest.load(engine).tensorrt.timing_cache.startswith("/old/mount/")


def test_symlinks_that_stay_inside_the_folder_are_fine(cli, engine):
    (engine / "weights").mkdir()
    shutil.move(engine / "unet.onnx.data", engine / "weights" / "unet.onnx.data")
    (engine / "unet.onnx.data").symlink_to("weights/unet.onnx.data")
    code, out, err = cli("info", engine, "--verify")
    assert code == 0 and "ok       unet.onnx.data" in out, err


def _set(path, value):
    """An edit setting ``data[path...] = value`` (a dotted path; integers index lists)."""
    *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]

    def edit(data):
        for key in keys:
            data = data[key]
        data[last] = value
    return edit


NUMBERS = [
    ("model.embedding_slots", -5, "model.embedding_slots = -5 (must be 0.."),  # was: "-5 of -5 left"
    ("model.embedding_slots", 63, "embedding_slots 63 rows of text_hidden_size 32, but the text encoder's token table is 870 x 32"),
    ("model.embedding_slots", 10**9, "embedding_slots = 1000000000 (at most 65536)"),
    ("model.vocab_size", 2**40, "vocab_size + embedding_slots"),
    ("model.weights_seed", -1, "model.weights_seed = -1"),
    ("model.latent_channels", 10**9, "latent_channels = 1000000000 (at most 1024)"),
    ("model.max_text_length", 10**7, "max_text_length = 10000000 (at most 4096)"),
    ("model.text_hidden_size", 0, "text_hidden_size = 0"),
    ("ranges.batch_max", 10**9, "batch range 1..1000000000 (at most 4096)"),
    ("ranges.batch_min", -2, "batch range -2..4"),
    ("ranges.size_max", 2**40, "size range 64..1099511627776 (at most 32768 px)"),
    ("components.unet.size_bytes", -1, "components.unet.size_bytes = -1"),
    ("components.unet.sha256", "not-a-hash", "unet sha256 'not-a-hash' (64 hex digits)"),
    ("components.unet.inputs.0.max_shape.0", 2**40, "unet.latents max_shape"),
    ("components.unet.inputs.0.min_shape.0", -1, "unet.latents has inconsistent shapes"),
    ("components.unet.weights.conv_in.offset", 2**40, "unet weight conv_in ends at byte"),
    ("components.unet.weights.conv_in.offset", -8, "components.unet.weights.conv_in.offset = -8"),
    ("components.unet.weights.conv_in.shape", [0, 4], "unet weight conv_in: dtype 'float32', shape (0, 4)"),
    ("components.unet.memory.attention.0.heads", 0, "unet memory model has an attention with no heads"),
    ("components.unet.memory.attention.0.rows_per_row", -1.0, "unet memory model has a negative coefficient"),
    ("components.unet.memory.activation", [-1.0, 0.0], "unet memory model has a negative coefficient"),
    ("components.unet.memory.activation", [1e400, 0.0], "components.unet.memory.activation[0] = inf (must be a finite"),
    ("components.unet.flops.rows_input", "nope", "unet FLOP model names an input the graph does not have"),
    ("components.unet.flops.per_row", [1e400, 0.0, 0.0], "components.unet.flops.per_row[0] = inf (must be a finite"),
    ("components.unet.validation.0.tolerance", -1.0, "unet validation has a negative tolerance"),
    ("tensorrt", {**TRT, "opt_level": 9}, "tensorrt.opt_level = 9 (0..5)"),
    ("tensorrt", {**TRT, "workspace_gb": -1.0}, "tensorrt.workspace_gb = -1.0 (positive)"),
    ("tensorrt", {**TRT, "engines": {"nope": TRT["engines"]["unet"]}}, "an engine for 'nope', which is no component"),
    ("tensorrt", {**TRT, "engines": {"unet": {**TRT["engines"]["unet"], "profile": {
        "latents": [[4, 4, 8, 8], [2, 4, 8, 8], [1, 4, 8, 8]]}}}}, "unet engine profile of 'latents'"),
]


@pytest.mark.parametrize("path, value, needle", NUMBERS, ids=[f"{p}={str(v)[:20]}" for p, v, _ in NUMBERS])
def test_impossible_manifest_numbers_are_refused(cli, engine, path, value, needle):
    if path == "components.unet.weights.conv_in.shape":
        needle = needle.replace("float32", json.loads((engine / "manifest.json").read_text())["components"]["unet"]
                                ["weights"]["conv_in"]["dtype"])
    _edit(engine, _set(path, value))
    with pytest.raises(ManifestError, match="manifest.json holds impossible values") as ex:
        Manifest.load(engine)
    assert needle in str(ex.value)
    code, _, err = cli("info", engine)
    one_line(code, err, "info", needle)


def test_a_comparison_that_did_not_match_may_be_infinite(engine):
    _edit(engine, _set("components.unet.validation.0.max_rel_error", float("inf")))
    assert Manifest.load(engine).components["unet"].validation[0].max_rel_error == float("inf")


def test_export_controlnet_never_loads_a_path_named_as_the_built_in_source(cli, engine):
    _edit(engine, _set("model.source", "/etc"))  # weights_seed stays: only built-ins have one
    code, _, err = cli("export-controlnet", engine, "x=random")
    one_line(code, err, "export-controlnet", "records weights_seed for source '/etc', which is no built-in model")


@pytest.mark.parametrize("names", [["text_encoder", "clip"], ["text_encoder_2", "text_encoder_2"]])
def test_an_sdxl_manifests_encoder_names_are_diffusers_two_each_once(tiny_xl_model, tmp_path, names):
    """LoRA keys (text_encoder_2.…, lora_te2_…) and SDXL embeddings (clip_g) find an encoder by its diffusers name:
    another name, or one name twice, would send them to no encoder or to the wrong one."""
    import shutil

    engine = tmp_path / "xl"
    shutil.copytree(tiny_xl_model[0], engine)

    def edit(data):
        for e, name in zip(data["model"]["text_encoders"], names):
            e["diffusers_name"] = name
    _edit(engine, edit)
    with pytest.raises(ManifestError, match="text encoders' diffusers names"):
        Manifest.load(engine)
