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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtrt", description="Stable Diffusion on TensorRT / ONNX Runtime")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_export(sub)
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
