"""``sdtrt generate``: the generation settings from flags, a replayed image and defaults; the output paths (numbered
as A1111 numbers); the batch count; the control-image preview. A thin layer over ``Pipeline``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdtrt.cli import _finite, _size
from sdtrt.errors import UsageError

DEFAULTS = {"steps": 30, "cfg": 7.5}
IMAGE_FLAGS = ("image", "strength", "mask", "mask_blur", "padding_mask_crop", "outpaint", "outpaint_fill",
               "mask_invert", "inpainting_fill", "overlay")
INPAINTING_FILL_FLAGS = ("fill", "original", "latent-noise", "latent-nothing")  # request.INPAINTING_FILLS, 0..3


def _sides(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected L,T,R,B pixels, e.g. 64,0,64,0, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected 4 numbers L,T,R,B, got {text!r}")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"pixels must not be negative, got {text!r}")
    return values


def _hires(text: str) -> dict:
    """--hires: a scale (2, 1.5) or a target size WxH (A1111's hr_resize_x/y; 0 for one side keeps the aspect)."""
    text = text.strip().lower()
    if "x" in text:
        try:
            w, h = (int(v) for v in text.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a scale (2, 1.5) or WxH pixels (1024x768, 1024x0), got "
                                             f"{text!r}") from None
        if w < 0 or h < 0 or (w, h) == (0, 0):
            raise argparse.ArgumentTypeError(f"WxH must be pixels, one of them may be 0 (keep the aspect), got {text!r}")
        return {"scale": 2.0, "resize": (w, h)}
    try:
        scale = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a scale (2, 1.5) or WxH pixels (1024x768), got {text!r}") from None
    return {"scale": scale, "resize": (0, 0)}


def _pair(text: str) -> tuple[int, int]:
    """--crop-top-left TOP,LEFT pixels."""
    try:
        a, b = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT pixels, e.g. 0,0, got {text!r}") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"pixels must not be negative, got {text!r}")
    return a, b


def _timesteps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected descending integer timesteps, e.g. 999,749,499,249, got "
                                         f"{text!r}") from None


# SDXL's micro-conditioning and custom timesteps: flag -> GenerationRequest field (sizes given as WxH, stored (h, w))
CONDITIONING_FLAGS = {"original_size": "original_size", "target_size": "target_size",
                      "crop_top_left": "crops_coords_top_left", "aesthetic_score": "aesthetic_score",
                      "negative_aesthetic_score": "negative_aesthetic_score", "timesteps": "timesteps",
                      "scheduler_config": "scheduler_config"}

HIRES_FLAGS = {"hires_upscaler": "upscaler", "hires_steps": "steps", "hires_strength": "strength",
               "hires_prompt": "prompt", "hires_negative": "negative_prompt", "hires_sampler": "sampler"}


def add_generate(sub) -> None:
    from sdtrt.runtime.backends import BACKENDS
    from sdtrt.runtime.request import OUTPAINT_FILLS
    from sdtrt.runtime.samplers import SAMPLER_NAMES

    unset = argparse.SUPPRESS  # flags a PNG's parameters may set; given ones win
    p = sub.add_parser("generate", help="generate images from an engine folder",
                       description="Text to image, or from an image (--image: img2img; with --mask: inpainting; "
                                   "--outpaint: outpainting), with the engines of an engine folder (no torch needed). "
                                   "Prompts use A1111's syntax: (word:1.3), (word), [word], BREAK, any length up to "
                                   "the export's --max-chunks x 75 tokens.")
    p.add_argument("dir", help="engine folder written by `sdtrt export`")
    p.add_argument("prompt", nargs="?", default=unset, help="what to draw (optional with --from-png)")
    p.add_argument("-n", "--negative", default=unset, help="negative prompt (default: none)")
    p.add_argument("--steps", type=int, default=unset, help="denoising steps (default: 30)")
    p.add_argument("--cfg", type=_finite, default=unset,
                   help="guidance scale, 0..100; <= 1 runs without guidance, as diffusers (default: 7.5)")
    p.add_argument("--seed", type=int, default=unset,
                   help="seed (NumPy PCG64), 0..2^64-1; image i of a batch gets SEED + i (A1111); -1 or none: random, "
                        "below 2^32 (the seeds used are printed and saved)")
    p.add_argument("--size", type=_size, default=unset, metavar="WxH", help="image size (default: the model's)")
    p.add_argument("--scheduler", choices=SAMPLER_NAMES, default=unset, metavar="NAME",
                   help="sampler (default: the model's scheduler), optionally with a schedule where its diffusers "
                   "scheduler has that setting: euler_karras, unipc_exponential, ddim_trailing, euler_a_linspace, ...")
    p.add_argument("--clip-skip", type=int, default=unset, metavar="N",
                   help="A1111's Clip skip: 1 = the text encoder's last layer (default), 2 = the one before, ...")
    p.add_argument("--num-images", type=int, default=unset, help="images for the prompt, one batch (default: 1)")
    p.add_argument("--image", default=unset, metavar="PNG",
                   help="start from this image (img2img; with --mask, inpainting); the size defaults to its own, "
                        "rounded down to the model's multiple")
    p.add_argument("--strength", type=_finite, default=unset,
                   help="how much of --image is repainted, in (0, 1] (default: 0.8 img2img, 1.0 inpainting)")
    p.add_argument("--mask", default=unset, metavar="PNG", help="inpainting mask for --image: white is repainted")
    p.add_argument("--mask-blur", type=_finite, default=unset, metavar="PX",
                   help="Gaussian blur radius of the mask, in pixels (A1111's Mask blur; default: 0)")
    p.add_argument("--padding-mask-crop", type=int, default=unset, metavar="PX",
                   help="inpaint only the box around the mask grown by PX pixels, at full size, and paste it back "
                        "(A1111's 'Only masked')")
    p.add_argument("--outpaint", type=_sides, default=unset, metavar="L,T,R,B",
                   help="extend --image by these pixels on the left, top, right and bottom (multiples of 8), then "
                        "inpaint the new area")
    p.add_argument("--outpaint-fill", choices=OUTPAINT_FILLS, default=unset,
                   help="how the new area starts: its edge pixels repeated, the image mirrored, or gray (default: "
                        "edge)")
    from sdtrt.runtime.hires import UPSCALERS

    p.add_argument("--hires", type=_hires, default=unset, metavar="SCALE|WxH",
                   help="hires fix (A1111's): generate, upscale by SCALE or to WxH (0 for one side keeps the aspect; "
                        "both: cover and crop), then img2img at that size")
    p.add_argument("--hires-upscaler", choices=UPSCALERS, default=unset, metavar="NAME",
                   help=f"how the first pass is upscaled: {', '.join(UPSCALERS)} (default: Latent)")
    p.add_argument("--hires-steps", type=int, default=unset, metavar="N",
                   help="steps of the second pass (default: 0, the same as --steps)")
    p.add_argument("--hires-strength", type=_finite, default=unset, metavar="X",
                   help="denoising strength of the second pass, in (0, 1] (default: 0.7)")
    p.add_argument("--hires-prompt", default=unset, help="prompt of the second pass (default: the prompt)")
    p.add_argument("--hires-negative", default=unset, help="negative prompt of the second pass (default: --negative)")
    p.add_argument("--hires-sampler", choices=SAMPLER_NAMES, default=unset, metavar="NAME", help="sampler of the second pass "
                                                                            "(default: --scheduler)")
    p.add_argument("--mask-invert", action="store_true", default=unset,
                   help="repaint the mask's black area and keep its white (A1111's Mask mode: Inpaint not masked)")
    p.add_argument("--inpainting-fill", choices=INPAINTING_FILL_FLAGS, default=unset,
                   help="what the masked area starts as (A1111's Masked content): its original pixels (default, as "
                        "diffusers), the colours around it, latent noise, or zeros in latent space (latent nothing); "
                        "it shows below --strength 1, where the start is not pure noise")
    p.add_argument("--no-overlay", dest="overlay", action="store_false", default=unset,
                   help="inpainting: keep the VAE's whole output (diffusers' raw result) instead of pasting the "
                        "original pixels back outside the mask (A1111's overlay, the default)")
    p.add_argument("--control", action="append", default=[], metavar="[canny:]PNG[:SCALE[:START:END]]",
                   help="a control image for the folder's next ControlNet (the first --control goes to the first "
                        "ControlNet, ...): a ready-made map, or canny:PHOTO to take its Canny edges; SCALE is the "
                        "conditioning scale (default 1), START:END the fraction of the steps it acts in (default 0:1)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply this LoRA (diffusers/PEFT or kohya/A1111 .safetensors) at SCALE (default 1) without "
                        "re-export, on ONNX Runtime; repeat for several")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where A1111's <lora:NAME:WEIGHT> prompt tags find NAME.safetensors")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding (.safetensors: diffusers' learned_embeds, or A1111's, whose "
                        "file name is the token to write in prompts); repeat for several")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="load every .safetensors embedding of DIR (A1111's embeddings/ folder)")
    p.add_argument("--canny-low", type=int, default=None, metavar="T",
                   help="Canny's low hysteresis threshold, 0..10000 (default 100)")
    p.add_argument("--canny-high", type=int, default=None, metavar="T",
                   help="Canny's high hysteresis threshold (default 200)")
    p.add_argument("--from-png", default=None, metavar="PNG",
                   help="replay the generation parameters of an image (sdtrt's or A1111's: PNG, JPEG, WebP, GIF); "
                        "flags given override them. The LoRAs and embeddings it names are found among --lora, "
                        "--lora-dir and --embedding(s-dir) and checked by hash: a missing or different one is an "
                        "error")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT where built and usable, else ONNX Runtime (CUDA, then CPU)")
    p.add_argument("--n-iter", type=int, default=1, metavar="N",
                   help="batch count (A1111's): N generations of --num-images B each; image i of the whole job gets "
                        "SEED + i")
    p.add_argument("-o", "--output", default="out.png",
                   help="image path, .png (parameters in a text chunk) or .jpg/.jpeg/.webp (in EXIF, as A1111); if it "
                        "exists, or for several images, numbered NAME-0001.png, NAME-0002.png, ... after the highest "
                        "number already there")
    p.add_argument("--force", action="store_true",
                   help="overwrite: write -o itself, or NAME-0001.png on for several images")
    p.add_argument("--control-preview", default=None, metavar="PNG",
                   help="also save the control image each ControlNet reads (the canny edge map, sized), numbered as -o")
    sdxl = p.add_argument_group("SDXL", "a model family with micro-conditioning (diffusers' StableDiffusionXL "
                                        "argument names) and a refiner")
    sdxl.add_argument("--refiner", default=None, metavar="DIR",
                      help="engine folder of an SDXL refiner: the base denoises up to --refiner-start, the refiner "
                           "the rest from its latents (the ensemble of experts; A1111's refiner_checkpoint)")
    sdxl.add_argument("--refiner-start", type=_finite, default=None, metavar="X",
                      help="fraction of the schedule where the refiner takes over (diffusers' denoising_end / "
                           "denoising_start; A1111's refiner_switch_at; default 0.8)")
    sdxl.add_argument("--original-size", type=_size, default=None, metavar="WxH",
                      help="micro-conditioning: the training image's size the model is told (default: --size)")
    sdxl.add_argument("--target-size", type=_size, default=None, metavar="WxH",
                      help="micro-conditioning: the target size (default: --size)")
    sdxl.add_argument("--crop-top-left", type=_pair, default=None, metavar="TOP,LEFT",
                      help="micro-conditioning: the crop's top-left corner (default 0,0)")
    sdxl.add_argument("--aesthetic-score", type=_finite, default=None, metavar="X",
                      help="the refiner's aesthetic score (default 6)")
    sdxl.add_argument("--negative-aesthetic-score", type=_finite, default=None, metavar="X",
                      help="the refiner's negative aesthetic score (default 2.5)")
    from sdtrt.runtime.sampler_presets import FEW_STEP_PRESETS

    sdxl.add_argument("--scheduler-config", choices=FEW_STEP_PRESETS, default=None, metavar="NAME",
                      help="a few-step model's scheduler settings, as its model card gives them (sampler, spacing, "
                           "default steps and CFG): " + ", ".join(FEW_STEP_PRESETS))
    sdxl.add_argument("--timesteps", type=_timesteps, default=None, metavar="T1,T2,...",
                      help="custom timesteps, descending (few-step models: DMD2 999,749,499,249); --steps is their "
                           "count")
    p.set_defaults(func=_cmd_generate)


def _control_spec_problem(text: str, preprocessors) -> None:
    """Name what is wrong with a --control whose image path does not exist, when it is not the path: fields after an
    image that exists, or an unknown preprocessor in front of one (issue 22)."""
    parts = text.split(":")
    known = len(parts) > 1 and parts[0] in preprocessors
    if known:
        parts = parts[1:]
    for i in range(len(parts) - 1, 0, -1):
        head = ":".join(parts[:i])
        if Path(head).expanduser().is_file():
            raise UsageError(f"--control {text!r}: after the image {head} expected SCALE or SCALE:START:END (numbers), "
                             f"got {':'.join(parts[i:])!r}")
    if not known and len(parts) > 1 and len(parts[0]) > 1 and (
            Path(":".join(parts[1:])).expanduser().is_file()
            or parts[0].isalpha() and any(c in parts[1] for c in "./\\")):
        raise UsageError(f"--control {text!r}: unknown preprocessor {parts[0]!r} (known: {', '.join(preprocessors)})")


def control_spec(text: str) -> tuple[str, str, float | None, float | None, float | None]:
    """``[canny:|none:]PATH[:SCALE[:START:END]]`` -> (preprocessor, path, scale, start, end); None: not given. Numbers
    are read from the right, so a path may hold colons."""
    from sdtrt.runtime.request import PREPROCESSORS

    parts = text.split(":")
    pre = "none"
    if len(parts) > 1 and parts[0] in PREPROCESSORS:
        pre, parts = parts[0], parts[1:]
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        numbers.insert(0, value)
        parts = parts[:-1]
    path = ":".join(parts)
    if not path.strip():
        raise UsageError(f"--control {text!r}: no image path")
    if not Path(path).expanduser().exists():
        _control_spec_problem(text, PREPROCESSORS)
    if len(numbers) == 2:
        raise UsageError(f"--control {text!r}: give SCALE, or SCALE:START:END (not two numbers)")
    scale, start, end = (numbers + [None] * 3)[:3] if len(numbers) != 1 else (numbers[0], None, None)
    return pre, path, scale, start, end


def _controls(args, png: tuple[dict, ...]) -> dict:
    """The ControlNet arguments of the pipeline from the --control flags, a replayed PNG's values filling what a flag
    leaves out."""
    specs = [control_spec(c) for c in args.control]
    if png and not specs:
        names = ", ".join(str(c.get("Model", "?")) for c in png)
        raise UsageError(f"the image was made with {len(png)} ControlNet{'s' * (len(png) != 1)} ({names}): pass their "
                         "control images with --control (the images are not stored in the PNG)")
    if not specs:
        return {}
    old = list(png) + [{}] * len(specs)
    low = args.canny_low if args.canny_low is not None else int(next(
        (c["Threshold A"] for c in png if "Threshold A" in c), 100))
    high = args.canny_high if args.canny_high is not None else int(next(
        (c["Threshold B"] for c in png if "Threshold B" in c), 200))
    return dict(control_images=[path for _, path, *_ in specs],
                control_preprocessors=[pre for pre, *_ in specs],
                controlnet_conditioning_scale=[s if s is not None else old[i].get("Weight", 1.0)
                                               for i, (_, _, s, _, _) in enumerate(specs)],
                control_guidance_start=[s if s is not None else old[i].get("Guidance Start", 0.0)
                                        for i, (_, _, _, s, _) in enumerate(specs)],
                control_guidance_end=[e if e is not None else old[i].get("Guidance End", 1.0)
                                      for i, (_, _, _, _, e) in enumerate(specs)],
                canny_thresholds=(low, high))


def _output_paths(output: str, count: int, force: bool, flag: str = "-o/--output"):
    """The image paths, checked before any work: writable, a known image suffix. ``output`` itself for one image
    when it is free (or with ``force``); else ``NAME-0001.ext``, ... numbered after the highest ``NAME-NNNN`` of any
    image suffix already in the folder, as A1111 and ComfyUI number (``force``: from 0001, overwriting)."""
    import re
    from pathlib import Path

    from sdtrt.fsutil import check_writable
    from sdtrt.runtime.infotext import IMAGE_FORMATS

    path = Path(output)
    if not output.strip():
        raise UsageError(f"{flag} must not be empty")
    suffixes = ", ".join(IMAGE_FORMATS)
    if path.suffix.lower() not in IMAGE_FORMATS or not path.stem or path.name.startswith("."):
        raise UsageError(f"{flag} {output} must be a file name ending in one of {suffixes}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: {folder} is a file, not a folder")
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder")
    if count == 1 and (force or not os.path.lexists(path)):  # a dangling symlink counts as taken
        paths = [path]
    else:
        start = 1
        if not force:
            numbered = re.compile(re.escape(path.stem) + r"-(\d+)(?:" + "|".join(map(re.escape, IMAGE_FORMATS)) + ")$",
                                  re.IGNORECASE)
            taken = [int(m.group(1)) for e in os.listdir(folder) if (m := numbered.match(e))]
            start = max(taken, default=0) + 1
        paths = [path.with_name(f"{path.stem}-{k:04d}{path.suffix}") for k in range(start, start + count)]
    for target in paths:
        if target.is_dir():
            raise UsageError(f"cannot write {target}: it is a folder")
    for target in {paths[0], paths[-1]}:  # one folder: the first name and the longest stand for the rest
        try:
            check_writable(target)
        except OSError as ex:
            raise UsageError(f"cannot write {target}: {ex.strerror or ex}") from None
    return paths


def _generation_settings(args) -> dict:
    """The generation's arguments from the flags, a replayed PNG and the defaults, in that order of precedence. A
    PNG's ``Seed:`` is its image's own (image i of a batch: seed + i), so a replay makes that one image alone."""
    given = {k: getattr(args, k) for k in ("prompt", "negative", "steps", "cfg", "seed", "size", "scheduler",
                                           "clip_skip", "num_images", *IMAGE_FLAGS) if hasattr(args, k)}
    if args.from_png:
        from sdtrt.runtime.infotext import read_parameters, replay

        r = replay(read_parameters(args.from_png))
        png = {"prompt": r.prompt, "negative": r.negative_prompt, "steps": r.steps, "cfg": r.cfg, "seed": r.seed,
               "size": (r.width, r.height) if r.width and r.height else None, "scheduler": r.scheduler,
               "clip_skip": r.clip_skip, "karras": r.karras, "model_hash": r.model_hash,
               "strength": r.strength, "mask_blur": r.mask_blur, "padding_mask_crop": r.padding_mask_crop,
               "outpaint": r.outpaint, "outpaint_fill": r.outpaint_fill, "controls": r.controls, "hires": r.hires,
               "mask_invert": r.mask_invert, "inpainting_fill": r.inpainting_fill, "overlay": r.overlay,
               "conditioning": r.conditioning, "refiner": r.refiner, "refiner_switch_at": r.refiner_switch_at}
        if r.from_image and "image" not in given:
            what = f"Denoising strength {r.strength:g}" if r.strength is not None else "outpainting"
            raise UsageError(f"{args.from_png} was made from an input image ({what}): pass that image with --image "
                             "(and --mask for inpainting)")
        if r.shared_batch and "seed" not in given:
            raise UsageError(f"{args.from_png} holds {r.shared_batch}: an older sdtrt made it in a batch that shared "
                             "one generator, which this sdtrt does not reproduce (image i of a batch now gets seed + i,"
                             " as A1111); pass --seed to make a new image with its other settings")
        # its LoRAs and embeddings (replay.apply): those of a prompt a flag replaces are not needed
        png["replay"] = (r, "prompt" not in given, "negative" not in given)
        given = {**{k: v for k, v in png.items() if v is not None}, **given}
    if "prompt" not in given:
        raise UsageError("a prompt is needed (or --from-png IMAGE)")
    settings = {"negative": "", **DEFAULTS, "seed": None, "size": None, "scheduler": None, "clip_skip": 1,
                "num_images": 1, "image": None, "strength": None, "mask": None, "mask_blur": 0,
                "padding_mask_crop": None, "outpaint": None, "outpaint_fill": "edge", "mask_invert": False,
                "inpainting_fill": "original", "overlay": True, **given}
    settings["hires"] = _hires_settings(args, settings.get("hires"))
    settings["given"] = set(given)
    if isinstance(settings["clip_skip"], int) and settings["clip_skip"] < 1:
        raise UsageError(f"--clip-skip must be at least 1 (A1111's numbering: 1 = the last layer), got "
                         f"{settings['clip_skip']}")
    return settings


def _hires_settings(args, replayed: dict | None) -> dict | None:
    """The hires fix's fields (runtime.hires.Hires) from --hires and its flags over a replayed image's; None: none."""
    spec = {**(replayed or {}), **getattr(args, "hires", {})}
    flags = {f: getattr(args, f) for f in HIRES_FLAGS if hasattr(args, f)}
    if flags and not spec:
        raise UsageError(f"--{next(iter(flags)).replace('_', '-')} needs --hires SCALE or --hires WxH")
    return {**spec, **{HIRES_FLAGS[f]: v for f, v in flags.items()}} if spec else None


def _cmd_generate(args) -> int:
    from sdtrt.runtime import Pipeline, save_pngs
    from sdtrt.runtime.request import GenerationRequest
    from sdtrt.runtime.seeds import image_seeds, random_seed

    s = _generation_settings(args)
    width, height = s["size"] or (None, None)
    controls = _controls(args, s.get("controls", ()))
    control_images = controls.pop("control_images", None)
    flags = {field: getattr(args, flag) for flag, field in CONDITIONING_FLAGS.items()
             if getattr(args, flag, None) is not None}
    for field in ("original_size", "target_size"):  # WxH on the command line, (height, width) in the API
        if field in flags:
            flags[field] = flags[field][::-1]
    conditioning = {**(s.get("conditioning") or {}), **flags}  # a replayed image's, then the flags
    given = s.get("given", set())
    if conditioning.get("scheduler_config"):  # the model card's steps and CFG unless given
        from sdtrt.runtime.sampler_presets import few_step_preset

        preset = few_step_preset(conditioning["scheduler_config"])
        s["steps"] = s["steps"] if "steps" in given else preset.steps
        s["cfg"] = s["cfg"] if "cfg" in given else preset.guidance
        if hasattr(args, "scheduler"):
            raise UsageError("--scheduler and --scheduler-config: give one (the preset names its sampler)")
        s["scheduler"] = None  # a replayed image's Sampler is the preset's
    if conditioning.get("timesteps") and "steps" not in given:
        s["steps"] = len(conditioning["timesteps"])
    if args.refiner_start is not None and not args.refiner:
        raise UsageError("--refiner-start needs --refiner DIR")
    if s.get("refiner") and not args.refiner:
        raise UsageError(f"the image was made with the refiner {s['refiner']}: pass its engine folder with --refiner "
                         "DIR")
    refiner_start = args.refiner_start if args.refiner_start is not None else s.get("refiner_switch_at")
    request = GenerationRequest.create(s["prompt"], s["negative"], s["steps"], s["cfg"], height, width, s["seed"],
                                       s["num_images"], s["scheduler"], clip_skip=s["clip_skip"] - 1,
                                       strength=s["strength"], mask_blur=s["mask_blur"],
                                       padding_mask_crop=s["padding_mask_crop"], outpaint=s["outpaint"],
                                       outpaint_fill=s["outpaint_fill"], hires=s["hires"], mask_invert=s["mask_invert"],
                                       inpainting_fill=s["inpainting_fill"], overlay=s["overlay"], **controls,
                                       **conditioning)
    for flag in ("image", "mask"):
        if s[flag] is not None and not str(s[flag]).strip():
            raise UsageError(f"--{flag} must not be empty")
    if args.n_iter < 1:
        raise UsageError(f"--n-iter must be at least 1, got {args.n_iter}")
    per = request.batch
    paths = _output_paths(args.output, args.n_iter * per, args.force)
    previews = None
    if args.control_preview is not None:
        if not control_images:
            raise UsageError("--control-preview needs --control (this generation uses no ControlNet)")
        previews = _output_paths(args.control_preview, len(control_images), args.force, "--control-preview")
        same = sorted(set(previews) & set(paths))
        if same:
            raise UsageError(f"--control-preview and -o/--output name the same file ({same[0]}): give them different "
                             "names")
    embeddings = args.embedding + ([args.embeddings_dir] if args.embeddings_dir else [])
    replaying = s.get("replay")
    from contextlib import ExitStack

    with ExitStack() as stack:
        pipe = stack.enter_context(Pipeline.from_dir(args.dir, backend=args.backend,
                                                     loras=None if replaying else args.lora,
                                                     lora_dir=args.lora_dir, embeddings=embeddings))
        if replaying:  # the image's LoRAs found among --lora and --lora-dir, and checked, as its embeddings
            from sdtrt.runtime import replay

            r, prompt_kept, negative_kept = replaying
            replay.apply(pipe, r, args.lora, args.lora_dir, prompt_kept, negative_kept)
        refiner = rp = None
        if args.refiner:
            from sdtrt.runtime import refiner as ensemble

            if s["mask"] is not None or control_images:
                raise UsageError("--refiner is for text-to-image and img2img (no --mask, no --control)")
            # the base's embeddings (the refiner's encoder reads the prompt's tokens: clip_g); LoRAs are the base's
            refiner = stack.enter_context(Pipeline.from_dir(args.refiner, backend=args.backend, embeddings=embeddings))
            switch = refiner_start if refiner_start is not None else ensemble.DEFAULT_SWITCH
            rp = ensemble.plan(pipe, refiner, request, switch, s["image"])  # both models checked, before any compute
            plan = rp.base_plan
        else:
            plan = pipe.plan(request, s["image"], s["mask"], control_images)  # every check, before any compute
        if s.get("karras") and not plan.sampler.use_karras_sigmas:
            raise UsageError(f"the image used {plan.table.name} with the Karras schedule, which this model's scheduler "
                             "config does not set; pass --scheduler to choose another sampler")
        if s.get("model_hash") and s["model_hash"] != pipe.manifest.components["unet"].sha256[:10]:
            print(f"sdtrt generate: warning: the image was made with model hash {s['model_hash']}, this folder's is "
                  f"{pipe.manifest.components['unet'].sha256[:10]}: the result will differ", file=sys.stderr)
        if previews is not None:
            _save_control_maps(plan, previews, args.force)
        table = plan.table
        if table.num_steps != request.num_inference_steps - table.start:
            print(f"{table.name}: {table.num_steps} U-Net evaluations for {request.num_inference_steps - table.start} "
                  "steps (its warm-up evaluates one step twice)", file=sys.stderr)
        seed = request.seed if request.seed is not None else random_seed()  # a random seed is drawn once, for all
        for k in range(args.n_iter):  # A1111's batch count: image i of the whole job, across batches, gets seed + i
            steps = rp.total_steps if rp else plan.hires.total_steps if plan.hires else table.num_steps
            with _progress(steps) as bar:
                if rp is not None:
                    result = ensemble.run(pipe, refiner, rp, callback=bar, seeds=image_seeds(seed, per, k * per))
                else:
                    result = pipe.generate(request, callback=bar, plan=plan, seeds=image_seeds(seed, per, k * per))
            images = list(zip(result.images, result.parameters))
            batch_paths = paths[k * per:(k + 1) * per]
            # all or none, and without --force never over a file another run wrote meanwhile
            save_pngs([im for im, _ in images], batch_paths, [p for _, p in images], overwrite=args.force)
            for path in batch_paths:
                print(path)
            t = result.timings
            encode = f"vae encoder {t['vae_encoder']:.2f}s, " if plan.sources is not None else ""
            seeds = f"seed {result.seeds[0]}" + (f" to {result.seeds[-1]}" if per > 1 else "")
            print(f"{seeds}; {t['total']:.2f}s (text {t['text_encoder']:.2f}s, {encode}denoise "
                  f"{t['denoise']:.2f}s, vae {t['vae_decoder']:.2f}s) on {pipe.backend_name}", file=sys.stderr)
    return 0


def _save_control_maps(plan, paths, force: bool) -> None:
    """``--control-preview``: the control image each ControlNet reads (after its preprocessor, at the generation's
    size), as 8-bit RGB."""
    import numpy as np
    from PIL import Image

    from sdtrt.runtime import save_pngs

    maps = [Image.fromarray(np.round(c.array[0].transpose(1, 2, 0) * 255).astype(np.uint8)) for c in plan.controls]
    save_pngs(maps, paths, [f"ControlNet {j}: {c.name}, preprocessor {c.preprocessor}"
                            for j, c in enumerate(plan.controls)], overwrite=force)
    for path, control in zip(paths, plan.controls):
        print(f"control image of ControlNet {control.name}: {path}", file=sys.stderr)


class _progress:
    """A tqdm bar over U-Net evaluations (hidden when stderr is not a terminal), as a pipeline callback."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="denoising", unit="U-Net call", file=sys.stderr, leave=False,
                        disable=None)

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
