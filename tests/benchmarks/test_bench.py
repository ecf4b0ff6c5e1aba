"""`sdtrt bench` on tiny: the JSON it writes has every figure the issue asks for (not the speed)."""

import json
import math

import pytest
from PIL import Image

from sdtrt.cli import main
from sdtrt.config import to_dict
from sdtrt.memory import flops

pytestmark = pytest.mark.bench


def _number(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def test_bench_json_table_and_plot(tiny_fp32, tmp_path, capsys):
    """Every figure of sdtrt and diffusers eager, interleaved, at two sizes; and a third system in the same run
    (``--also-backend openvino``, checked in ``_check_also_backend``)."""
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", str(tiny_fp32[0]), "--size", "64x64", "96x64", "--steps", "3", "--runs", "2", "--warmup", "1",
                 "--out", str(out_json), "--plot", str(out_png), "--also-backend", "openvino"])
    table = capsys.readouterr().out
    assert code == 0
    _check_also_backend(json.loads(out_json.read_text()), table, ["sdtrt", "sdtrt[openvino]", "baseline"])
    result = json.loads(out_json.read_text())
    assert result["schema"] == "sdtrt-bench/1" and result["precision"] == "fp32"
    assert result["config"]["sizes"] == [[64, 64], [96, 64]] and result["config"]["runs"] == 2
    for key in ("cpu", "cpu_count", "python", "versions"):
        assert key in result["environment"]
    assert {"torch", "diffusers", "onnxruntime"} <= set(result["environment"]["versions"])
    assert [r["size"] for r in result["results"]] == ["64x64", "96x64"]
    for entry in result["results"]:
        assert entry["psnr_db_vs_baseline"] >= 40  # same weights, scheduler and latents
        for name in ("sdtrt", "baseline"):
            s = entry["systems"][name]
            assert len(s["latency_s"]["all"]) == 2
            assert all(_number(s["latency_s"][k]) for k in ("median", "p90", "min"))
            assert s["latency_s"]["min"] <= s["latency_s"]["median"] <= s["latency_s"]["p90"]
            assert _number(s["images_per_s"]) and _number(s["unet_it_per_s"])
            assert set(s["components_s"]) == {"text_encoder", "unet_per_step", "sampler_update_per_step", "vae_decoder"}
            assert all(_number(v) for v in s["components_s"].values())
            assert s["steps"] == 4  # PNDM: one extra U-Net call for its warm-up
            # the roofline figure: the U-Net's FLOPs per step (2 rows: guidance 7.5) over its time per step
            assert s["unet_tflops_achieved"] == pytest.approx(
                entry["unet_tflop_per_step"] / s["components_s"]["unet_per_step"])
    for entry, (w, h) in zip(result["results"], [(64, 64), (96, 64)]):
        expected = flops(tiny_fp32[1].components["unet"], {"latents": (1, 4, h // 8, w // 8),
                                                           "encoder_hidden_states": (2, 77, 32)})
        assert entry["unet_tflop_per_step"] == pytest.approx(expected / 1e12) and expected > 0
    assert result["unet_flops_from"] == "manifest"
    for name in ("sdtrt", "baseline"):
        assert _number(result["cold_start_s"][name]) and _number(result["load_s"][name])
        assert result["memory"][name]["peak_host_rss_mb"] > 0
    assert result["memory"]["sdtrt"]["peak_host_rss_mb"] != result["memory"]["baseline"]["peak_host_rss_mb"]
    assert _number(result["host_overhead"]["us_per_step"])
    assert "| U-Net it/s |" in table and "PSNR vs baseline" in table
    assert "| U-Net achieved TFLOP/s |" in table and "| U-Net FLOPs per step (TFLOP) |" in table
    assert Image.open(out_png).size[0] > 100


def _without_flop_counts(engine):
    """The folder as an sdtrt before the FLOP counts wrote it."""
    data = json.loads((engine / "manifest.json").read_text())
    for c in data["components"].values():
        c.pop("flops", None)
    (engine / "manifest.json").write_text(json.dumps(data))


def test_bench_without_baseline(engine, tmp_path, capsys):
    """An older export (no FLOP counts in its manifest) without a baseline: the roofline figure is n/a, and says why."""
    _without_flop_counts(engine)
    assert main(["bench", str(engine), "--size", "64x64", "--steps", "2", "--runs", "1", "--warmup", "0",
                 "--baseline", "none", "--size", "72x64", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["size"] for r in result["results"]] == ["64x64", "72x64"]  # a repeated --size adds, not replaces
    entry = result["results"][0]
    assert list(entry["systems"]) == ["sdtrt"]
    assert entry["unet_tflop_per_step"] is None and entry["systems"]["sdtrt"]["unet_tflops_achieved"] is None
    assert result["unet_flops_from"] is None and "--baseline none" in entry["unet_flops_note"]
    table = capsys.readouterr().out
    assert "| U-Net achieved TFLOP/s | n/a |" in table and "U-Net achieved TFLOP/s n/a: the engine folder's" in table


def test_the_baseline_check_counts_an_older_exports_flops(engine, tiny_fp32):
    """The bench's check worker rebuilds the PyTorch model anyway: for a manifest without a FLOP model it counts the
    U-Net's, as the export would have."""
    from sdtrt.benchmarks.baseline import check_baseline_weights

    _without_flop_counts(engine)  # (with them it counts nothing: test_bench_json_table_and_plot's "manifest")
    assert check_baseline_weights(str(engine)) == {"unet_flops": to_dict(tiny_fp32[1].components["unet"].flops)}


@pytest.mark.parametrize("flags, needle", [(["--size", "2048x2048"], "exported range"), (["--runs", "0"], "--runs"),
                                           (["--batch", "9"], "batch 9"),
                                           (["--backend", "onnxruntime-cpu", "--also-backend", "onnxruntime-cpu"],
                                            "that is sdtrt's --backend already"),
                                           (["--also-backend", "openvino", "--also-backend", "openvino"], "each backend once")])
def test_bench_bad_input(tiny_fp32, capsys, flags, needle):
    code = main(["bench", str(tiny_fp32[0]), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sdtrt bench: error: ") and needle in err[-1]


def test_bench_with_another_sdtrt_backend_alone(tiny_fp32, tmp_path, capsys):
    """--also-backend openvino without a baseline, each system alone."""
    out = tmp_path / "r.json"
    assert main(["bench", str(tiny_fp32[0]), "--size", "64x64", "--steps", "2", "--runs", "1", "--warmup", "0",
                 "--backend", "onnxruntime-cpu", "--also-backend", "openvino", "--out", str(out), "--baseline", "none",
                 "--one-at-a-time"]) == 0, capsys.readouterr().err
    _check_also_backend(json.loads(out.read_text()), capsys.readouterr().out, ["sdtrt", "sdtrt[openvino]"])


def _check_also_backend(result, table, names):
    """--also-backend openvino: a third system, "sdtrt[openvino]", in its own worker beside sdtrt (ONNX Runtime) and
    diffusers, with its own figures, its PSNR against both, and the precision OpenVINO ran in."""
    entry = result["results"][0]
    assert list(entry["systems"]) == names and result["config"]["also_backends"] == ["openvino"]
    assert entry["systems"]["sdtrt[openvino]"]["backend"].startswith("openvino (CPU, ")
    for name in names:
        assert _number(entry["systems"][name]["components_s"]["unet_per_step"])
        assert _number(result["cold_start_s"][name]) and _number(result["load_s"][name])
        assert result["memory"][name]["peak_host_rss_mb"] > 0
    assert entry["psnr_db_vs_sdtrt"]["sdtrt[openvino]"] >= 60
    if "baseline" in names:
        assert entry["psnr_db"]["sdtrt"] == entry["psnr_db_vs_baseline"] >= 40
        assert entry["psnr_db"]["sdtrt[openvino]"] >= 40
    details = result["backend_details"]["sdtrt[openvino]"]
    assert details["inference_precision"] in ("f32", "bf16") and "FP32" in details["optimization_capabilities"]
    assert "| metric | " + " | ".join(names) + " |" in table and "| PSNR vs sdtrt (dB) |" in table
    assert f"precision {details['inference_precision']}" in table


def test_a_baseline_that_is_not_the_exported_model_is_refused(engine, capsys):
    # the same source rebuilt with other weights (here another seed; in life, built-in weights changed since the
    # export): its PSNR would be a wrong number, not a finding
    data = json.loads((engine / "manifest.json").read_text())
    data["model"]["weights_seed"] = 1
    (engine / "manifest.json").write_text(json.dumps(data))
    code = main(["bench", str(engine), "--size", "64x64", "--steps", "2", "--runs", "1", "--warmup", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sdtrt bench: error: the baseline model differs from the one exported to "
                                            f"{engine}: "), err
    assert "re-export" in err[-1]


@pytest.mark.parametrize("flags", [pytest.param(["--steps", "3", "--cfg", "5"], marks=pytest.mark.slow),
                                   ["--scheduler-config", "lightning", "--steps", "2", "--cfg", "0"]])
def test_bench_on_an_sdxl_model_one_system_at_a_time_with_a_lora(tiny_xl_model, tmp_path, capsys, flags):
    """SDXL against diffusers' StableDiffusionXLPipeline (both encoders timed), a few-step preset on both systems,
    each system alone (--one-at-a-time), with a LoRA (U-Net and both encoders) on both systems: ours applied without
    re-export, diffusers' through load_lora_weights; the images agree (a LoRA left out on either side would not) and
    reading + applying it is timed on both."""
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.synthetic import random_lora

    lora = tmp_path / "style.safetensors"
    random_lora(Manifest.load(tiny_xl_model[0]), lora, 4, 0, 0.3)
    out = tmp_path / "r.json"
    args = ["bench", str(tiny_xl_model[0]), "--size", "96x64", "--runs", "1", "--warmup", "0", "--one-at-a-time",
            "--out", str(out), *flags]
    assert main([*args, "--lora", f"{lora}:0.8"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    entry = result["results"][0]
    assert entry["psnr_db_vs_baseline"] >= 60
    assert entry["systems"]["sdtrt"]["steps"] == entry["systems"]["baseline"]["steps"] == int(flags[flags.index("--steps") + 1])
    assert result["config"]["one_at_a_time"] and all(result["memory"][k]["peak_host_rss_mb"] > 0
                                                      for k in ("sdtrt", "baseline"))
    assert result["config"]["loras"] == [f"{lora}:0.8"]
    assert all(_number(result["lora_s"][k]) for k in ("sdtrt", "baseline"))
    assert "LoRAs: read and apply" in capsys.readouterr().out
    assert main([*args, "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("task", [pytest.param("txt2img", marks=pytest.mark.slow), "img2img"])
def test_bench_with_sdxl_controlnets(tiny_xl_control, tmp_path, capsys, task):
    """Two ControlNets on an SDXL folder against diffusers' StableDiffusionXLControlNetPipeline (or its Img2Img
    variant, whose conditioning scale defaults to 0.8 where ours is 1: the baseline is given 1), the built-ins
    rebuilt from their seeds; the ControlNets timed on both sides."""
    out = tmp_path / "r.json"
    assert main(["bench", str(tiny_xl_control), "--size", "96x64", "--steps", "3", "--runs", "1", "--warmup", "0",
                 "--controlnet", "2", "--task", task, "--out", str(out)]) == 0, capsys.readouterr().err
    entry = json.loads(out.read_text())["results"][0]
    assert entry["psnr_db_vs_baseline"] >= 60
    for name in ("sdtrt", "baseline"):
        assert _number(entry["systems"][name]["components_s"]["controlnet_per_step"])
