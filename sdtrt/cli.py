"""``sdtrt`` command line: a thin layer that turns library calls into one line and an exit code.

- ``SdtrtError`` (bad input, missing files, unsupported models): ``sdtrt <command>: error: <message>``, exit 2;
  argparse usage errors get the same single line;
- an ``OSError`` the library did not expect (disk full, permissions, read-only filesystem): one line with the
  OS's reason and the file, exit 2;
- anything else is an internal error: one line asking for a report, exit 1;
- Ctrl-C: ``interrupted``, exit 130; SIGTERM: ``terminated``, exit 143 (both clean up like an error);
- a closed stdout (``sdtrt info DIR | head``): quiet, exit 141.
``SDTRT_DEBUG=1`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Sequence

from sdtrt.errors import SdtrtError, Terminated, UsageError

REPORT = "https://github.com/sdtrt/sdtrt/issues"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not where the help already says its default, not for options without one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        if isinstance(action.default, tuple):
            shown = ("x" if action.metavar == "WxH" else ":").join(map(str, action.default))
        else:
            shown = action.default
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        # "-5:64" and "-64x64" are values (so that the option's own check names the problem), not unknown options
        self._negative_number_matcher = re.compile(r"^-\d[\d.:xX]*$|^-\.\d+$")

    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def _range(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}")
    return values[0], values[1]


def _triple(text: str) -> tuple[int, int, int]:
    try:
        values = [int(p) for p in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX integers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX, got {text!r}")
    return values[0], values[1], values[2]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 512x512, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return w, h


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _need(extra: str, *modules: str) -> None:
    """Refuse before any work when an optional dependency is missing, naming the extra that brings it."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SdtrtError(f"this needs {', '.join(missing)}: pip install 'sdtrt[{extra}]' "
                         f"(install torch==2.13.0 first on CPU machines)")


# ---- export ------------------------------------------------------------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to validated ONNX + manifest (needs sdtrt[export])",
                       description="Export a Stable Diffusion model to ONNX graphs, each checked against PyTorch "
                                   "(parity gate), and a manifest. Nothing is written unless every graph passes.")
    from sdtrt.export.architectures import BUILTIN_ARCHITECTURES

    builtins = ", ".join(name for name, arch in BUILTIN_ARCHITECTURES.items() if arch.supported)
    p.add_argument("model", help="a diffusers folder, a single-file checkpoint (.safetensors; .ckpt with "
                                 f"--allow-pickle), or a built-in architecture with seeded random weights: {builtins}")
    p.add_argument("--out", help="engine folder to write (default: engines/<model name>)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                   help="graph precision; fp16 keeps FP32 where fp16 overflows")
    p.add_argument("--batch", type=_range, default=(1, 4), metavar="MIN:MAX", help="batch range the graphs are validated for")
    p.add_argument("--size", type=_range, default=None, metavar="MIN:MAX",
                   help="image height/width range in pixels, multiples of 8 (default 256 to twice the model's own "
                        "size, at least 1024: SD 1.x 256:1024, SDXL 256:2048)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder: replaces sdtrt's files there (what its manifest lists), keeps "
                        "every other file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled (.bin) weights in a diffusers folder; only for files you trust")
    p.add_argument("--seed", type=int, default=0, help="weight seed of built-in architectures")
    p.add_argument("--max-chunks", type=int, default=3,
                   help="longest prompt, in 75-token chunks (A1111's long-prompt rule; the U-Net's text axis is 77 x this)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="export even when this machine's available memory looks too small for the model")
    p.add_argument("--config", default=None, metavar="NAME",
                   help="single-file checkpoints: the built-in configuration that describes it (default: read from its "
                        "keys: sd15, sd21, sdxl, sdxl-refiner and their -inpaint variants)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the scheduler's prediction type (single-file SD 2.x defaults to v_prediction)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="single-file checkpoints: a CLIP tokenizer folder (the tokenizer/ of a diffusers model of "
                        "the same family; SDXL: the model folder, its tokenizer/ and tokenizer_2/) when the "
                        "configuration's does not match the checkpoint's vocabulary")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse this LoRA (diffusers/PEFT or kohya/A1111 .safetensors) into the U-Net and text encoder "
                        "at SCALE (default 1), as diffusers' fuse_lora; repeat for several")
    p.add_argument("--controlnet", action="append", default=[], metavar="[NAME=]PATH",
                   help="also export this ControlNet (a diffusers ControlNetModel folder, or 'random': seeded random "
                        "weights shaped like the model's U-Net); repeat, or separate with commas, for several")
    p.set_defaults(func=_cmd_export)


def _add_export_controlnet(sub) -> None:
    p = sub.add_parser("export-controlnet", help="add a ControlNet to an engine folder (needs sdtrt[export])",
                       description="Export one more ControlNet into an engine folder, for the U-Net already there "
                                   "(no re-export of the model), through the same parity gate.")
    p.add_argument("dir", help="engine folder written by `sdtrt export`")
    p.add_argument("controlnet", metavar="[NAME=]PATH",
                   help="a diffusers ControlNetModel folder, or 'random' (built-in models only)")
    p.add_argument("--force", action="store_true", help="replace a ControlNet of the same name")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled (.bin) weights; only for files you trust")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    p.set_defaults(func=_cmd_export_controlnet)


def _cmd_export_controlnet(args) -> int:
    _need("export", "torch", "diffusers", "transformers", "onnx")
    from sdtrt.export.controlnet_export import add_controlnet
    from sdtrt.export.exporter import MAX_OPSET

    if not 17 <= args.opset <= MAX_OPSET:
        raise UsageError(f"--opset must be 17..{MAX_OPSET} (what torch.onnx.export writes), got {args.opset}")
    add_controlnet(args.dir, args.controlnet, allow_pickle=args.allow_pickle, force=args.force, opset=args.opset)
    return 0


def _cmd_export(args) -> int:
    from pathlib import Path

    if args.out is not None and not args.out.strip():
        raise UsageError("--out must not be empty")
    _need("export", "torch", "diffusers", "transformers", "onnx")
    from sdtrt.export import ExportConfig, export

    name = Path(args.model.rstrip("/"))
    out = args.out or str(Path("engines") / (name.stem if name.suffix in (".safetensors", ".ckpt") else name.name))
    config = ExportConfig(
        model=args.model, out=out, precision=args.precision, batch_min=args.batch[0], batch_max=args.batch[1],
        size_min=args.size[0] if args.size else 256, size_max=args.size[1] if args.size else None, opset=args.opset, force=args.force,
        allow_pickle=args.allow_pickle, seed=args.seed, max_chunks=args.max_chunks,
        controlnets=tuple(c.strip() for spec in args.controlnet for c in spec.split(",")), loras=tuple(args.lora),
        config=args.config, prediction_type=args.prediction_type, tokenizer=args.tokenizer,
        memory_check=not args.no_memory_check,
    )
    if args.out is None:
        Path("engines").mkdir(exist_ok=True)  # the default's own folder; an explicit --out's parent must exist
    export(config)
    return 0


# ---- build, doctor -----------------------------------------------------------------------------------------

def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an engine folder (on the target GPU)",
                       description="Build one TensorRT engine per graph, precision as typed in the ONNX, verify each "
                                   "against ONNX Runtime on this GPU, then install them. No torch needed.")
    p.add_argument("dir", help="engine folder written by `sdtrt export`")
    p.add_argument("--batch", type=_triple, default=None, metavar="MIN:OPT:MAX",
                   help="batch profile (default: the export's batch range, OPT = its minimum)")
    p.add_argument("--size", type=_triple, default=None, metavar="MIN:OPT:MAX",
                   help="height/width profile in pixels (default: the export's size range, OPT = the model's default "
                        "size)")
    p.add_argument("--static", type=_size, default=None, metavar="WxH", help="one fixed shape (batch = OPT, guidance on)")
    p.add_argument("--timing-cache", default=None, metavar="PATH",
                   help="timing cache file (default: DIR/timing.trt<version>.sm<cc>.cache)")
    p.add_argument("--workspace", type=_finite, default=None, metavar="GB",
                   help="builder workspace limit (default: the GPU's free memory less the graph's weights and 1 GiB)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    p.add_argument("--no-verify", action="store_true",
                   help="install the engines without checking them against ONNX Runtime on this GPU")
    p.add_argument("--refittable", action="store_true",
                   help="build the U-Net and text encoders refittable, so LoRAs and embeddings apply without a rebuild "
                        "(trt.Refitter; TensorRT may pick slower kernels for refittable engines)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="build even when the GPU's free memory looks too small for the largest graph")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    cfg = BuildConfig(batch=args.batch, size=args.size, static=args.static, timing_cache=args.timing_cache,
                      workspace_gb=args.workspace, opt_level=args.opt_level, verify=not args.no_verify,
                      refittable=args.refittable, memory_check=not args.no_memory_check)
    build_engines(args.dir, cfg, log=lambda s: print(s, file=sys.stderr))
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine can run: TensorRT, CUDA, driver, GPU, and a folder's engines",
                       description="Report TensorRT, cuda-python, driver and CUDA versions, the GPU, ONNX Runtime's "
                                   "providers and whether DIR's engines match this machine (exit 0 when it could report).")
    p.add_argument("dir", nargs="?", default=None, help="engine folder to check (optional)")
    p.add_argument("--run", action="store_true",
                   help="also run a short generation on DIR's TensorRT engines and compare it with ONNX Runtime")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    from pathlib import Path

    from sdtrt.runtime.doctor import diagnose, run_check

    if args.run and args.dir is None:
        raise UsageError("--run needs an engine folder: sdtrt doctor DIR --run")
    if args.dir is not None and not Path(args.dir).is_dir():
        raise UsageError(f"{args.dir} is {'a file, not' if Path(args.dir).exists() else 'not'} an engine folder")
    mark = {True: "ok", False: "!!", None: "  "}
    for f in diagnose(args.dir):
        print(f"{mark[f.ok]} {f.label + ':':<18} {f.value}")
    if args.run:
        check = run_check(args.dir)
        print(f"{mark[check.passed]} {'run:':<18} {check.batch}x {check.width}x{check.height}, {check.steps} "
              f"{check.sampler} steps, TensorRT vs {check.reference}: PSNR {check.psnr_db:.1f} dB "
              f"(need {check.min_psnr_db:.0f})")
        return 0 if check.passed else 1
    return 0


# ---- info --------------------------------------------------------------------------------------------------

def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show an engine folder's manifest and what can run it here",
                       description="Describe an engine folder: model, graphs, parity results, TensorRT engines, and "
                                   "the backends of this machine that can run it.")
    p.add_argument("dir", help="engine folder")
    p.add_argument("--verify", action="store_true",
                   help="hash every graph and engine file and compare with the manifest (exit 2 on a mismatch)")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    from pathlib import Path

    from sdtrt.fsutil import folder_lock, remove_stale
    from sdtrt.integrity import folder_files, stray_files, verify_files
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.backends import available_backends

    folder = Path(args.dir)
    with folder_lock(folder, "sdtrt info", wait=False) as free:  # a writer at work cleans up after itself
        if free or not folder.exists():
            remove_stale(folder.parent, folder.name)  # an export killed before it could clean up
            remove_stale(folder)
    m = Manifest.load(folder)
    info = m.model
    print(f"{args.dir}: {info.family} from {info.source}, {m.precision}, manifest schema {m.schema_version}")
    print(f"  prediction {info.prediction_type}, {info.latent_channels} latent channels, VAE x{info.vae_scale_factor} "
          f"(scaling {info.vae_scaling_factor}), text {info.text_hidden_size}-d")
    print(f"  prompts up to {info.max_chunks} chunk(s) of {info.max_text_length - 2} tokens "
          f"({info.max_text_length} x {info.max_chunks} on the U-Net's text axis), Clip skip 1.."
          f"{info.clip_skips + 1} (A1111's numbering)")
    r = m.ranges
    print(f"  batch {r.batch_min}..{r.batch_max}, size {r.size_min}..{r.size_max} px (multiples of 8), "
          f"default {info.default_size}x{info.default_size}")
    for name, c in m.components.items():
        mb = c.size_bytes / 1e6
        worst = max((v.max_rel_error for v in c.validation), default=float("nan"))
        print(f"  {name:<13} {c.file:<20} {c.precision:<5} {mb:9.1f} MB  parity {worst:.1e} "
              f"({'pass' if all(v.passed for v in c.validation) else 'FAIL'})")
        for s in c.inputs + c.outputs:
            dims = ", ".join(f"{d}" if lo == hi else f"{d}={lo}..{hi}" for d, lo, hi in zip(s.shape, s.min_shape, s.max_shape))
            arrow = "in " if s in c.inputs else "out"
            print(f"      {arrow} {s.name:<22} {s.dtype:<8} [{dims}]")
        for island in c.fp32_islands:
            print(f"      fp32: {island}")
    print("  exported with " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    if m.tensorrt is not None:
        b = m.tensorrt
        print(f"  TensorRT engines: TensorRT {b.version} for {b.gpu} (sm_{b.compute_capability}), "
              f"{'static' if b.static else 'dynamic'} profile")
        if b.verification:
            worst = max((r for rs in b.verification.values() for r in rs), key=lambda r: r.max_rel_error)
            e2e = f"; end to end PSNR {b.end_to_end.psnr_db:.1f} dB" if b.end_to_end else ""
            print(f"    verified on that GPU against ONNX Runtime: worst max rel err {worst.max_rel_error:.2e} "
                  f"(tolerance {worst.tolerance:g}){e2e}")
        else:
            print("    not verified (built with --no-verify)")
    problems = verify_files(folder, folder_files(m), full=args.verify, use_cache=not args.verify)
    if args.verify:
        for entry in folder_files(m):
            status = next((p for p in problems if p.startswith(entry.file + ":")), None)
            print(f"  {'MISMATCH' if status else 'ok':<8} {entry.file}" + (f" ({status.split(': ', 1)[1]})" if status else ""))
        # a note, not a failure: sdtrt never reads a file its manifest does not list (docs/reliability.md)
        for name in stray_files(folder, m):
            print(f"  note     {name} is not listed in manifest.json: sdtrt does not use it (left by an interrupted "
                  "run or an older export?); delete it if it is not yours")
    if problems:
        print(f"this folder cannot run: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if args.verify:
            raise SdtrtError(f"{len(problems)} file(s) do not match manifest.json: {problems[0]}")
        return 0
    print("this machine can run it with: " + ", ".join(available_backends()))
    return 0


# ---- bench -------------------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    from sdtrt.benchmarks.harness import TASKS
    from sdtrt.runtime.backends import BACKENDS
    from sdtrt.runtime.samplers import SAMPLERS

    p = sub.add_parser("bench", help="benchmark the runtime against eager PyTorch (diffusers)",
                       description="Latency, per-component time, memory and fidelity of sdtrt against diffusers.")
    p.add_argument("dir", help="engine folder")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="sdtrt's backend")
    p.add_argument("--also-backend", action="append", choices=BACKENDS, default=[], metavar="BACKEND",
                   help="also time sdtrt on this backend (repeatable), a system of its own in the same run: "
                        "\"sdtrt[BACKEND]\" beside \"sdtrt\" and the baseline, e.g. --also-backend openvino")
    p.add_argument("--baseline", choices=("torch", "torch-compile", "none"), default="torch",
                   help="what to compare with (diffusers' StableDiffusionPipeline)")
    p.add_argument("--size", type=_size, nargs="+", action="extend", default=None, metavar="WxH",
                   help="one or more sizes, after one --size or repeated (default: the model's)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--batch", type=int, default=1, help="images per generation")
    p.add_argument("--runs", type=int, default=5, help="timed runs per size and system")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--scheduler", choices=SAMPLERS, default=None, help="sampler (default: the model's)")
    p.add_argument("--task", choices=TASKS, default="txt2img",
                   help="what to time: text to image, or from a synthetic picture (img2img; inpaint: its centre "
                        "masked)")
    p.add_argument("--strength", type=_finite, default=None,
                   help="img2img/inpaint strength (default: diffusers': 0.8 img2img, 1.0 inpaint)")
    p.add_argument("--controlnet", type=int, default=0, metavar="N",
                   help="also run the folder's first N ControlNets (synthetic control maps), against diffusers' "
                        "ControlNet pipelines")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA on both systems (repeatable): sdtrt applies it without re-export, diffusers loads it "
                        "with load_lora_weights; the report times reading and applying it")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per system (0: the library's default; at most 4x the cores)")
    from sdtrt.runtime.sampler_presets import FEW_STEP_PRESETS

    p.add_argument("--scheduler-config", choices=FEW_STEP_PRESETS, default=None, metavar="NAME",
                   help="a few-step preset for both systems (" + ", ".join(FEW_STEP_PRESETS) + "); --steps and "
                        "--cfg still say how many steps and which guidance")
    p.add_argument("--cfg", type=_finite, default=7.5, help="guidance scale (both systems)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run each system alone (all its runs, then the other's) instead of interleaved: two "
                        "SDXL-size models in fp32 do not fit in 24 GB together")
    p.add_argument("--out", help="write the full result as JSON here")
    p.add_argument("--plot", help="write a per-component bar chart (PNG) here (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json

    from sdtrt.fsutil import check_writable

    if args.baseline != "none":
        _need("bench", "torch", "diffusers", "transformers")
    if args.plot:
        _need("bench", "matplotlib")
    cores = os.cpu_count() or 1
    if not 0 <= args.threads <= 4 * cores:
        raise UsageError(f"--threads must be 0 (default) or 1..{4 * cores} (4x the {cores} cores), got {args.threads}")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            try:
                check_writable(path)
            except OSError as ex:
                raise UsageError(f"{flag}: cannot write {path}: {ex.strerror or ex}") from None

    from sdtrt.benchmarks.harness import BenchConfig, run_bench
    from sdtrt.benchmarks.report import markdown, plot
    from sdtrt.config import write_json_atomic
    from sdtrt.manifest import Manifest

    manifest = Manifest.load(args.dir)
    sizes = tuple(args.size) if args.size else ((manifest.model.default_size,) * 2,)
    cfg = BenchConfig(engine_dir=args.dir, backend=args.backend, baseline=args.baseline, sizes=sizes, steps=args.steps,
                      batch=args.batch, runs=args.runs, warmup=args.warmup, scheduler=args.scheduler, threads=args.threads,
                      task=args.task, strength=args.strength, controlnets=args.controlnet,
                      scheduler_config=args.scheduler_config, guidance_scale=args.cfg,
                      one_at_a_time=args.one_at_a_time, loras=tuple(args.lora),
                      also_backends=tuple(args.also_backend))
    result = run_bench(cfg)
    result["command"] = "sdtrt " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("sdtrt") else None
    print(markdown(result))
    if args.out:
        write_json_atomic(args.out, json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


# ---- main --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtrt", description="Stable Diffusion on TensorRT / ONNX Runtime")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_export(sub)
    _add_export_controlnet(sub)
    from sdtrt.cli_generate import add_generate

    add_generate(sub)
    _add_info(sub)
    _add_bench(sub)
    _add_build(sub)
    _add_doctor(sub)
    from sdtrt.cli_serve import add_commands as add_serve

    add_serve(sub)
    from sdtrt.cli_make import add_commands

    add_commands(sub)
    return parser


def _version() -> str:
    from sdtrt import __version__

    return f"sdtrt {__version__}"


class _StderrHandler:
    """Library warnings as ``sdtrt <command>: warning: ...`` lines on the current stderr, while main() runs."""

    def __init__(self, prefix: str):
        import logging

        class Handler(logging.Handler):
            def emit(self, record):
                print(f"{prefix}: warning: {record.getMessage()}", file=sys.stderr)

        self.logger = logging.getLogger("sdtrt")
        self.handler = Handler(logging.WARNING)
        self.prefix = prefix

    def __enter__(self):
        import logging
        import warnings

        self.logger.addHandler(self.handler)
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.WARNING)
        # Python warnings (NumPy's, PIL's, a library's) as one line too, never with a source path and line
        self.showwarning, prefix = warnings.showwarning, self.prefix

        def show(message, category, filename, lineno, file=None, line=None):
            text = " ".join(str(message).split())
            print(f"{prefix}: warning: {category.__name__}: {text[:500]}", file=sys.stderr)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        import warnings

        self.logger.removeHandler(self.handler)
        warnings.showwarning = self.showwarning


_deferred: dict = {"signal": None, "thread": None}  # a signal that arrived during an import, not yet raised


def _on_signal(signum, frame):
    """SIGTERM raises ``Terminated``, SIGINT ``KeyboardInterrupt``, where the program is, so cleanup runs, except
    inside an import: there the exception can surface in a C++ extension's module code (torch's), which aborts
    the process (pybind11's ``error_already_set`` -> std::terminate, seen in 1 of ~40 SIGTERMs during an export's
    first second). Then the signal is kept (one, however many arrive) and sent again every 50 ms by one thread
    until the import is over; ``main`` turns one still kept at its end into its exit code."""
    import threading

    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            if _deferred["signal"] is None:
                _deferred["signal"] = signum
                thread = threading.Thread(target=_resend, args=(signum,), daemon=True)
                _deferred["thread"] = thread
                thread.start()
            return
        f = f.f_back
    _deferred["signal"] = None
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _resend(signum: int) -> None:
    import time

    while _deferred["signal"] == signum and signal.getsignal(signum) is _on_signal:
        time.sleep(0.05)
        if _deferred["signal"] == signum and signal.getsignal(signum) is _on_signal:
            os.kill(os.getpid(), signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    prefix = f"sdtrt {command}".strip()
    debug = os.environ.get("SDTRT_DEBUG", "") not in ("", "0")
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    _deferred["signal"] = None
    try:
        with _StderrHandler(prefix):
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if isinstance(getattr(args, "dir", None), str) and not args.dir.strip():
                raise UsageError("the engine folder path is empty")
            if not getattr(args, "func", None):
                parser.print_help(sys.stderr)
                raise UsageError("a command is needed (see the list above)")
            if extra and args.command == "generate" and not hasattr(args, "prompt") and len(extra) == 1 \
                    and not extra[0].startswith("-"):
                # argparse gives an optional positional its default as soon as DIR is seen, so a prompt written
                # after the options (generate DIR --seed 1 "a cat") arrives here
                args.prompt, extra = extra[0], []
            if extra:
                raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
            return args.func(args)
    except SdtrtError as ex:
        if debug:
            raise
        print(f"{prefix}: error: {ex}", file=sys.stderr)
        return ex.exit_code
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prefix}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`| head`): say nothing more
        _silence_stdout()
        return 141
    except OSError as ex:
        if debug:
            raise
        where = f": {ex.filename}" if getattr(ex, "filename", None) else ""
        print(f"{prefix}: error: {ex.strerror or ex}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prefix}: error: out of memory: use a smaller size or batch", file=sys.stderr)
        return 2
    except Exception as ex:  # a bug: one line, and where to report it
        if debug:
            raise
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
        print(f"{prefix}: internal error: {type(ex).__name__}{': ' + first if first else ''} (please report this at "
              f"{REPORT}; SDTRT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        kept, _deferred["signal"] = _deferred["signal"], None  # stops the resending thread
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, handler)
        if kept is not None:  # arrived during an import and was never raised: it still ends the run
            print(f"{prefix}: {'terminated' if kept == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
            return 143 if kept == signal.SIGTERM else 130  # noqa: B012


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
