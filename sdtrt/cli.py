"""``sdtrt`` command line: a thin layer that turns library calls into one line and an exit code.

Every ``SdtrtError`` is printed as ``sdtrt <command>: error: <message>`` with exit code 2; usage
errors from argparse get the same single-line form.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sdtrt.errors import SdtrtError, UsageError


class _Parser(argparse.ArgumentParser):
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


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX + manifest (needs sdtrt[export])",
                       description="Export a Stable Diffusion model to validated ONNX graphs and a manifest.")
    p.add_argument("model", help="diffusers folder, or a built-in architecture: tiny, sd15, sd21")
    p.add_argument("--out", help="engine folder to write (default: engines/<model name>)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--batch", type=_range, default=(1, 4), metavar="MIN:MAX", help="batch range (default 1:4)")
    p.add_argument("--size", type=_range, default=(256, 1024), metavar="MIN:MAX",
                   help="image height/width range in pixels, multiples of 8 (default 256:1024)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled (.bin) weights in a diffusers folder; only for files you trust")
    p.add_argument("--seed", type=int, default=0, help="weight seed of built-in architectures")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from pathlib import Path

    try:
        from sdtrt.export import ExportConfig, export
    except ImportError as ex:
        raise SdtrtError(f"export needs the [export] extra (pip install 'sdtrt[export]'): {ex}") from None
    out = args.out or str(Path("engines") / Path(args.model.rstrip("/")).name)
    config = ExportConfig(
        model=args.model, out=out, precision=args.precision, batch_min=args.batch[0], batch_max=args.batch[1],
        size_min=args.size[0], size_max=args.size[1], opset=args.opset, force=args.force,
        allow_pickle=args.allow_pickle, seed=args.seed,
    )
    export(config)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 512x512, got {text!r}") from None
    return w, h


def _add_generate(sub) -> None:
    from sdtrt.runtime.backends import BACKENDS
    from sdtrt.runtime.samplers import SAMPLERS

    p = sub.add_parser("generate", help="generate images from an engine folder",
                       description="Text to image with the engines of an engine folder (no torch needed).")
    p.add_argument("dir", help="engine folder written by `sdtrt export`")
    p.add_argument("prompt")
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (<= 1 disables guidance)")
    p.add_argument("--seed", type=int, default=None, help="seed (NumPy PCG64); random if not given")
    p.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size (default: the model's)")
    p.add_argument("--scheduler", choices=SAMPLERS, default=None, help="sampler (default: the model's scheduler)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with several images, -1, -2 ... are added")
    p.set_defaults(func=_cmd_generate)


def _check_writable(output: str) -> None:
    """Fail before any work if ``output`` cannot be written."""
    import os
    from pathlib import Path

    path = Path(output)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {output}: folder {folder} does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write {output}: it is a folder")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {output}: permission denied")


def _output_paths(output: str, count: int):
    from pathlib import Path

    path = Path(output)
    if path.suffix.lower() != ".png":
        raise UsageError(f"output {output} must end in .png")
    _check_writable(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def _cmd_generate(args) -> int:
    from sdtrt.runtime import Pipeline, save_png

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.cfg < 0:
        raise UsageError(f"--cfg must be >= 0, got {args.cfg}")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    paths = _output_paths(args.output, args.num_images)
    pipe = Pipeline.from_dir(args.dir, backend=args.backend)
    width, height = args.size or (None, None)
    result = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                  height=height, width=width, seed=args.seed, num_images_per_prompt=args.num_images,
                  scheduler=args.scheduler, callback=_progress_bar("denoising"))
    for image, params, path in zip(result.images, result.parameters, paths):
        try:
            save_png(image, path, params)
        except OSError as ex:
            raise SdtrtError(f"cannot write {path}: {ex.strerror or ex}") from None
        print(path)
    t = result.timings
    print(f"seed {result.seed}; {t['total']:.2f}s (text {t['text_encoder']:.2f}s, denoise {t['denoise']:.2f}s, "
          f"vae {t['vae_decoder']:.2f}s) on {pipe.backend_name}", file=sys.stderr)
    return 0


def _progress_bar(label: str):
    width = 30

    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done != total:
            return
        filled = width * done // total
        end = "\n" if done == total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def _triple(text: str) -> tuple[int, int, int]:
    try:
        values = [int(p) for p in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX integers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX, got {text!r}")
    return values[0], values[1], values[2]


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an engine folder (on the target GPU)",
                       description="Build one FP16/FP32 (as typed in the ONNX) TensorRT engine per graph, no torch needed.")
    p.add_argument("dir")
    p.add_argument("--batch", type=_triple, default=(1, 1, 4), metavar="MIN:OPT:MAX")
    p.add_argument("--size", type=_triple, default=(256, 512, 1024), metavar="MIN:OPT:MAX", help="pixels")
    p.add_argument("--static", type=_size, default=None, metavar="WxH", help="one fixed shape (batch = OPT, guidance on)")
    p.add_argument("--timing-cache", default=None, metavar="PATH", help="timing cache file (default: DIR/timing.trt<version>.sm<cc>.cache)")
    p.add_argument("--workspace", type=float, default=None, metavar="GB")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    p.add_argument("--no-verify", action="store_true",
                   help="install the engines without checking them against ONNX Runtime on this GPU")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    cfg = BuildConfig(batch=args.batch, size=args.size, static=args.static, timing_cache=args.timing_cache,
                      workspace_gb=args.workspace, opt_level=args.opt_level, verify=not args.no_verify)
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
    from sdtrt.runtime.doctor import diagnose, run_check

    from pathlib import Path

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


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show an engine folder's manifest and what can run it here")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    from sdtrt.manifest import Manifest
    from sdtrt.runtime.backends import available_backends

    m = Manifest.load(args.dir)
    info = m.model
    print(f"{args.dir}: {info.family} from {info.source}, {m.precision}, manifest schema {m.schema_version}")
    print(f"  prediction {info.prediction_type}, {info.latent_channels} latent channels, VAE x{info.vae_scale_factor} "
          f"(scaling {info.vae_scaling_factor}), text {info.max_text_length} tokens x {info.text_hidden_size}")
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
    print("this machine can run it with: " + ", ".join(available_backends()))
    return 0


def _add_bench(sub) -> None:
    from sdtrt.runtime.backends import BACKENDS
    from sdtrt.runtime.samplers import SAMPLERS

    p = sub.add_parser("bench", help="benchmark the runtime against eager PyTorch (diffusers)",
                       description="Latency, per-component time, memory and fidelity of sdtrt against diffusers.")
    p.add_argument("dir", help="engine folder")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--baseline", choices=("torch", "torch-compile", "none"), default="torch")
    p.add_argument("--size", type=_size, nargs="+", default=None, metavar="WxH", help="one or more sizes (default: the model's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--scheduler", choices=SAMPLERS, default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per system (default: library default)")
    p.add_argument("--out", help="write the full result as JSON here")
    p.add_argument("--plot", help="write a per-component bar chart (PNG) here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json

    from sdtrt.benchmarks.harness import BenchConfig, run_bench
    from sdtrt.benchmarks.report import markdown, plot
    from sdtrt.config import write_json_atomic
    from sdtrt.manifest import Manifest

    manifest = Manifest.load(args.dir)
    sizes = tuple(args.size) if args.size else ((manifest.model.default_size,) * 2,)
    cfg = BenchConfig(engine_dir=args.dir, backend=args.backend, baseline=args.baseline, sizes=sizes, steps=args.steps,
                      batch=args.batch, runs=args.runs, warmup=args.warmup, scheduler=args.scheduler, threads=args.threads)
    for path in (args.out, args.plot):
        if path:
            _check_writable(path)
    result = run_bench(cfg)
    result["command"] = "sdtrt " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("sdtrt") else None
    print(markdown(result))
    if args.out:
        write_json_atomic(args.out, json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtrt", description="Stable Diffusion on TensorRT / ONNX Runtime")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_export(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_bench(sub)
    _add_build(sub)
    _add_doctor(sub)
    return parser


def _version() -> str:
    from sdtrt import __version__

    return f"sdtrt {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), "")
    prefix = f"sdtrt {command}".strip()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except SdtrtError as ex:
        print(f"{prefix}: error: {ex}", file=sys.stderr)
        return ex.exit_code
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
