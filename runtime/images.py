"""Input images and masks for img2img, inpainting and outpainting, prepared as diffusers' ``VaeImageProcessor`` does.

The image path is PIL, not OpenCV, on purpose: diffusers prepares images with PIL (Lanczos resizing, ``GaussianBlur``
for ``mask_blur``, RGBa compositing for ``apply_overlay``), and the same library gives the same pixels, so an image
prepared here is bit-identical to the one diffusers feeds its VAE. What PIL does not do (reading a mask's bounding box
as diffusers' ``get_crop_region`` does, the outpainting canvas) is written here in NumPy.

Reference: diffusers ``image_processor.VaeImageProcessor`` (``preprocess``, ``get_crop_region``, ``_resize_and_fill``,
``_resize_and_crop``, ``blur``, ``binarize``, ``apply_overlay``) and ``StableDiffusionInpaintPipeline``.
"""

from __future__ import annotations

import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.errors import UsageError
from sdtrt.runtime.request import OUTPAINT_FILLS  # how the new area of an outpainting canvas starts
ORIENTATION = 0x0112  # the EXIF Orientation tag
OUTPAINT_OVERLAP = 8  # pixels of the original image, along each extended side, repainted with the new area


def load_image(source: Any, label: str = "image", max_pixels: int | None = None):
    """A PIL image from a path, a PIL image, or a NumPy array (H, W[, C]) of uint8, or floats in [0, 1], upright: an
    EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as diffusers' ``load_image`` and A1111 do.

    A file is decoded completely here (``open_image``), so a truncated or corrupt file is a ``UsageError`` now, not
    later; so is one over ``max_pixels`` (or PIL's decompression-bomb limit), before its pixels are decoded."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = _upright(source, label)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not str(source):
            raise UsageError(f"{label}: the path is empty")
        if not path.exists():
            raise UsageError(f"{label} {path} does not exist")
        if not path.is_file():
            raise UsageError(f"{label} {path} is not a file")
        image = open_image(path, f"{label} {path}", max_pixels)
    elif isinstance(source, np.ndarray):
        image = _array_image(source, label)
    else:
        raise UsageError(f"{label} must be a path, a PIL image or a NumPy array, got {type(source).__name__}")
    if image.width < 1 or image.height < 1:
        raise UsageError(f"{label} is empty ({image.width}x{image.height})")
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise UsageError(f"{label} is {image.width}x{image.height}, over the limit of {max_pixels} pixels per image")
    return image


# PIL's decompression-bomb check warns (DecompressionBombWarning) between Image.MAX_IMAGE_PIXELS and twice that, and
# raises above. Here both refuse: the warning is silenced around Image.open only, and the size checked after it.
# Warnings filters are process-wide: the lock keeps two threads (a server's request and its engine) from restoring
# each other's.
_OPEN_LOCK = threading.Lock()
# what PIL raises for a damaged file: its own errors, and the ones its parsers let through
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, struct.error, EOFError)


def open_image(source, label: str, max_pixels: int | None = None, decode: bool = True):
    """An image file (a path or a binary file object) as an upright PIL image, decoded completely; or a
    ``UsageError`` in one line. The size is read from the header and checked first (``max_pixels``, and PIL's
    decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``, refused rather than warned about), so an oversized image is
    refused before its pixels take memory. PNG text chunks that expand beyond PIL's ``PngImagePlugin.MAX_TEXT_CHUNK``
    (or ``MAX_TEXT_MEMORY`` together) are refused too. ``decode=False``: the opened file, not decoded (the caller
    closes it); no orientation is applied, and no decompression-bomb limit (nothing is decoded)."""
    from PIL import Image

    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit = Image.MAX_IMAGE_PIXELS
            if not decode:  # only the header and text are read: no pixels, so no bomb
                Image.MAX_IMAGE_PIXELS = None
            try:
                opened = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except Image.DecompressionBombError as ex:
        raise UsageError(f"{label} is too large to decode safely ({_first_line(ex)})") from None
    except _DECODE_ERRORS as ex:
        raise UsageError(_unreadable(label, ex)) from None
    try:
        width, height = opened.size
        if width < 1 or height < 1:
            raise UsageError(f"{label} is empty ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise UsageError(f"{label} is {width}x{height}, over the limit of {max_pixels} pixels per image")
        if decode and Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise UsageError(f"{label} is {width}x{height}, over PIL's decompression-bomb limit of "
                             f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS): too large to decode safely")
    except UsageError:
        opened.close()
        raise
    if not decode:
        return opened
    with opened:
        try:
            opened.load()  # decode now: a truncated file fails here
        except _DECODE_ERRORS as ex:
            raise UsageError(_unreadable(label, ex)) from None
        upright = _upright(opened, label)
        return opened.copy() if upright is opened else upright


def _upright(image, label: str):
    """``image`` turned by its EXIF orientation (``ImageOps.exif_transpose``: the tag removed), or ``image`` itself
    when it has none (or 1, upright)."""
    from PIL import ImageOps

    try:
        if image.getexif().get(ORIENTATION, 1) in (1, None):
            return image
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as ex:
        raise UsageError(f"{label} has EXIF data that cannot be read ({_first_line(ex)})") from None


def _unreadable(label: str, ex: BaseException) -> str:
    if "MAX_TEXT" in str(ex):  # PngImagePlugin's limits on text chunks
        return f"{label} holds text chunks that expand beyond what PIL reads safely ({_first_line(ex)})"
    if str(ex).startswith("cannot identify image file <"):  # a file object's repr says nothing to the user
        return f"{label} is not a readable image (no image format PIL reads: PNG, JPEG, WebP, ...)"
    return f"{label} is not a readable image ({_first_line(ex)})"


def _first_line(ex: BaseException) -> str:
    text = str(ex).strip()
    return text.splitlines()[0][:200] if text else type(ex).__name__


def _array_image(array: np.ndarray, label: str):
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UsageError(f"{label} array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise UsageError(f"{label} array of floats must hold values in [0, 1], got "
                             f"{np.nanmin(array):g}..{np.nanmax(array):g}" if np.isfinite(array).any()
                             else f"{label} array holds no finite value")
        data = (array * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    else:
        raise UsageError(f"{label} array must be uint8, or floats in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(data))


def default_size(image, multiple: int) -> tuple[int, int]:
    """(height, width) of ``image`` rounded down to ``multiple`` (diffusers' get_default_height_width)."""
    return image.height - image.height % multiple, image.width - image.width % multiple


def _resample(name: str = "lanczos"):
    from PIL import Image

    return {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[name]


def resize_fill(image, width: int, height: int):
    """Fit inside (width, height) keeping the aspect ratio, centred; the rest is filled by stretching the edge rows or
    columns (diffusers' ``_resize_and_fill``, used with ``padding_mask_crop``)."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=_resample())
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def resize_crop(image, width: int, height: int):
    """Cover (width, height) keeping the aspect ratio, centred, the excess cut (diffusers' ``_resize_and_crop``)."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=_resample())
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def _prepare(image, height: int, width: int, crop: tuple[int, int, int, int] | None, fill: bool):
    if crop is not None:
        image = image.crop(crop)
    if fill:
        return resize_fill(image, width, height)
    return image.resize((width, height), resample=_resample())


def prepare_image(image, height: int, width: int, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1], as ``VaeImageProcessor.preprocess`` (crop, Lanczos resize or, after a crop,
    resize-and-fill; RGB; normalise)."""
    return _normalised(_prepare(image.convert("RGB"), height, width, crop, crop is not None))


def _normalised(image) -> np.ndarray:
    """An RGB PIL image as (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return (2.0 * array - 1.0).transpose(2, 0, 1)[None]  # (1, 3, H, W)


def prepare_control_image(image, height: int, width: int, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(1, 3, H, W) float32 in [0, 1]: a ControlNet's control image as diffusers' control image processor
    (``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``: Lanczos resize, RGB, no normalisation; after
    ``padding_mask_crop``, the same crop and resize-and-fill as the image, as StableDiffusionControlNetInpaintPipeline)."""
    image = _prepare(image.convert("RGB"), height, width, crop, crop is not None)
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]  # (1, 3, H, W)


CANNY_THRESHOLDS = (100, 200)  # diffusers' ControlNet examples and A1111's ControlNet extension defaults


def canny(image, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]):
    """Canny edges of ``image`` as a control map (white edges on black, RGB): OpenCV's ``cv2.Canny`` on the image's
    pixels with hysteresis thresholds ``low`` < ``high``, as diffusers' ControlNet examples prepare canny maps."""
    from PIL import Image

    try:
        import cv2
    except ImportError:
        raise UsageError("the canny preprocessor needs OpenCV: pip install 'sdtrt[control]' "
                         "(opencv-python-headless)") from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _mask_mode(mask):
    """L and RGB masks stay as they are (diffusers resizes them in their own mode and converts to grayscale last);
    any other mode (palette, 1-bit, with alpha) is read as its grayscale."""
    return mask if mask.mode in ("L", "RGB") else mask.convert("L")


def blur_mask(mask, radius: float):
    """diffusers' ``VaeImageProcessor.blur``: PIL's GaussianBlur with this radius (A1111's "Mask blur")."""
    from PIL import ImageFilter

    return _mask_mode(mask).filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def sized_mask(mask, height: int, width: int, crop: tuple[int, int, int, int] | None = None):
    """The mask (PIL, "L", soft where blurred) as the generation sees it: cropped, resized as the image."""
    return _prepare(_mask_mode(mask), height, width, crop, crop is not None).convert("L")


def prepare_mask(mask, height: int, width: int, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(1, 1, H, W) float32 in {0, 1} (1: repaint), as diffusers' mask processor (crop, Lanczos resize or
    resize-and-fill after a crop, grayscale, binarised at 0.5)."""
    return _binary(sized_mask(mask, height, width, crop))


def _binary(mask) -> np.ndarray:
    array = np.asarray(mask, dtype=np.float32) / 255.0  # (H, W)
    return (array >= 0.5).astype(np.float32)[None, None]  # (1, 1, H, W)


def invert_mask(mask):
    """The mask with black and white swapped (A1111's ``inpainting_mask_invert``: ``ImageOps.invert`` before the
    blur), in the mode the mask is read in (``_mask_mode``)."""
    from PIL import ImageOps

    return ImageOps.invert(_mask_mode(mask))


# A1111's masking.fill: the premultiplied image outside the mask, blurred at these radii (each composited this many
# times, coarse to fine), so the masked area takes the colours around it
FILL_BLURS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image, mask):
    """``image`` (RGB) with the area under ``mask`` ("L", soft where blurred) painted with the colours around it:
    A1111's ``modules/masking.py fill``, what its "Masked content: fill" encodes (and latent noise/nothing, before
    they replace the masked latents). Outside the mask the pixels are unchanged."""
    from PIL import Image, ImageFilter, ImageOps

    kept = Image.new("RGBa", image.size)  # premultiplied, transparent under the mask
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_BLURS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def latent_fill(latents: np.ndarray, mask: np.ndarray, noise: np.ndarray, how: str) -> np.ndarray:
    """A1111's latent "Masked content" on the image latents (B, C, h, w) under the latent mask (B, 1, h, w) in
    {0, 1}: "latent nothing" zeroes them, "latent noise" puts the initial noise (B, C, h, w) there (A1111 draws it
    from the image's seed, as its initial noise); anything else leaves them as they are."""
    if how == "latent nothing":
        return latents * (1 - mask)
    if how == "latent noise":
        return latents * (1 - mask) + noise * mask
    return latents


def overlay_mask(mask):
    """A1111's ``mask_for_overlay`` in whole-picture mode: the (blurred) mask doubled, so the generated pixels cover
    everything the blurred mask reaches by half or more and the original shows only where it fades out."""
    from PIL import Image

    return Image.fromarray(np.clip(np.asarray(mask.convert("L"), np.float32) * 2, 0, 255).astype(np.uint8))


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(N, 1, H, W) -> (N, 1, H/f, W/f) by nearest-neighbour sampling: torch's ``interpolate`` (mode 'nearest') at an
    integer factor takes pixel (f*i, f*j), which is what diffusers' prepare_mask_latents does."""
    return np.ascontiguousarray(mask[:, :, ::factor, ::factor])


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-zero pixels, grown by ``pad`` and then to the aspect ratio of
    (width, height) within the image (diffusers' ``get_crop_region``; A1111's "inpaint only masked")."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    # an all-zero mask keeps diffusers' arithmetic: every column counts from both sides
    left, right = (int(cols[0]), w - 1 - int(cols[-1])) if len(cols) else (w, w)
    top, bottom = (int(rows[0]), h - 1 - int(rows[-1])) if len(rows) else (h, h)
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
    if x2 <= x1 or y2 <= y1:
        raise UsageError("the mask is all black: nothing to crop around (padding_mask_crop needs a white area)")
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow(y1 - diff // 2, y2 + diff - diff // 2, h)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow(x1 - diff // 2, x2 + diff - diff // 2, w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, size: int) -> tuple[int, int]:
    """Shift [lo, hi) back inside [0, size) as diffusers' get_crop_region does (clamped at the far side last)."""
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def apply_overlay(mask, original, image, crop: tuple[int, int, int, int] | None):
    """Keep the original where the mask is black (soft where it is blurred), over the generated image: diffusers' and
    A1111's ``apply_overlay``. With ``crop`` the generated crop is first pasted back at full resolution
    (``padding_mask_crop``); without, ``image`` has the original's size (whole-picture inpainting, the mask from
    ``overlay_mask``)."""
    from PIL import Image, ImageOps

    width, height = original.width, original.height
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    if crop is not None:
        x, y, x2, y2 = crop
        base = Image.new("RGBA", (width, height))
        base.paste(resize_crop(image, x2 - x, y2 - y), (x, y))
        image = base.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


def outpaint_canvas(image, left: int, top: int, right: int, bottom: int, fill: str = "edge",
                    overlap: int = OUTPAINT_OVERLAP, mask=None):
    """The canvas and mask that outpainting inpaints: ``image`` grown by (left, top, right, bottom) pixels.

    The new area starts as ``fill``: ``"edge"`` (each border pixel repeated outwards), ``"reflect"`` (the image
    mirrored at its border) or ``"gray"`` (mid-gray). The mask (mode "L") is white over the new area and over an
    ``overlap``-pixel band of the original along each extended side, so the seam is repainted too; black elsewhere, or
    ``mask`` (the original's size) where given. Returns (canvas, mask), both RGB/L PIL images of the new size:
    ``Pipeline(image=canvas, mask_image=mask)`` is exactly what ``Pipeline(image=image, outpaint=...)`` runs."""
    from PIL import Image

    pads = (left, top, right, bottom)
    if fill not in OUTPAINT_FILLS:
        raise UsageError(f"outpaint fill must be one of {', '.join(OUTPAINT_FILLS)}, got {fill!r}")
    if any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0 for p in pads) or not any(pads):
        raise UsageError(f"outpaint needs non-negative integer pixels (left, top, right, bottom), at least one "
                         f"positive; got {tuple(pads)}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise UsageError(f"outpaint overlap must be a non-negative integer, got {overlap!r}")
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
    h, w = rgb.shape[:2]
    widths = ((top, bottom), (left, right), (0, 0))
    if fill == "gray":
        canvas = np.pad(rgb, widths, mode="constant", constant_values=128)
    else:
        canvas = np.pad(rgb, widths, mode="edge" if fill == "edge" else "reflect")
    new = np.full(canvas.shape[:2], 255, np.uint8)  # (H', W')
    inner = np.zeros((h, w), np.uint8)
    if mask is not None:
        m = mask.convert("L")
        if m.size != (w, h):
            raise UsageError(f"mask is {m.width}x{m.height}, the image {w}x{h}: they must be the same size")
        inner = np.asarray(m).copy()
    band = min(overlap, h, w)
    if band:
        if left:
            inner[:, :band] = 255
        if right:
            inner[:, w - band:] = 255
        if top:
            inner[:band] = 255
        if bottom:
            inner[h - band:] = 255
    new[top:top + h, left:left + w] = inner
    return Image.fromarray(canvas), Image.fromarray(new, mode="L")


@dataclass(frozen=True)
class SourceImages:
    """What a generation starts from, prepared at the generation's size (``prepare_sources``)."""

    image: np.ndarray  # (N, 3, H, W) float32 in [-1, 1], N = 1 or the batch
    mask: np.ndarray | None  # (N, 1, H, W) float32 in {0, 1}, 1: repaint; None for img2img
    crop: tuple[int, int, int, int] | None  # padding_mask_crop's box in the original image
    # the PIL images and masks the result is pasted back onto (apply_overlay): padding_mask_crop's full-size originals
    # and blurred masks; in whole-picture inpainting with overlay, the images at the generation's size and overlay_mask
    originals: tuple = ()
    masks: tuple = ()

    @property
    def masked_image(self) -> np.ndarray:
        """The image with the repainted area zeroed (diffusers: ``init_image * (mask < 0.5)``): (N, 3, H, W)."""
        return self.image * (self.mask < 0.5)


def prepare_sources(images: list, masks: list | None, height: int, width: int, factor: int,
                    padding_mask_crop: int | None = None, fill: bool = False, overlay: bool = False,
                    inverted: bool = False) -> SourceImages:
    """The images (and masks) as the pipeline feeds them: all at (height, width); checks that each mask has its
    image's size and marks some but not all of it. ``fill``: the masked area painted with the colours around it
    (``fill_masked``, A1111's inpainting_fill other than original) before it is encoded; ``overlay``: keep what
    whole-picture inpainting pastes the original back with (A1111's overlay; ``padding_mask_crop`` always does);
    ``inverted``: the masks were inverted (``mask_invert``), which the messages say."""
    after = " after mask_invert" if inverted else ""
    crops = None
    if masks is not None:
        for i, (image, mask) in enumerate(zip(images, masks)):
            which = f" {i + 1}" if len(images) > 1 else ""
            if mask.size != image.size:
                raise UsageError(f"mask{which} is {mask.width}x{mask.height}, the image {image.width}x{image.height}: "
                                 "they must be the same size")
            _check_coverage(prepare_mask(mask, mask.height, mask.width), which, after)
        if padding_mask_crop is not None:
            crops = [crop_region(m, width, height, padding_mask_crop) for m in masks]
            if len(set(crops)) > 1:
                raise UsageError("padding_mask_crop with several masks needs them to give the same crop box")
    crop = crops[0] if crops else None
    rgb = [_prepare(im.convert("RGB"), height, width, crop, crop is not None) for im in images]  # as prepare_image
    sized = None if masks is None else [sized_mask(m, height, width, crop) for m in masks]
    pasted = ()
    if sized is not None and overlay and crop is None:
        pasted = (tuple(rgb), tuple(overlay_mask(m) for m in sized))
    if sized is not None and fill:
        rgb = [fill_masked(im, m) for im, m in zip(rgb, sized)]
    image = np.concatenate([_normalised(im) for im in rgb])  # (N, 3, H, W)
    mask = None
    if sized is not None:
        mask = np.concatenate([_binary(m) for m in sized])  # (N, 1, H, W)
        for i in range(len(mask)):
            which = f" {i + 1}" if len(mask) > 1 else ""
            _check_coverage(mask[i:i + 1], which, f"{after} at {width}x{height}")
            if not latent_mask(mask[i:i + 1], factor).any():
                raise UsageError(f"mask{which} is too thin: at {width}x{height} it covers no latent pixel ({factor}x"
                                 f"{factor} pixels each), so nothing would be repainted; widen it or use mask_blur")
    if crop:
        pasted = (tuple(images), tuple(masks))
    return SourceImages(image, mask, crop, *pasted)


def _check_coverage(mask: np.ndarray, which: str, where: str) -> None:
    if not mask.any():
        raise UsageError(f"mask{which} is all black{where}: nothing would be repainted (white marks what to repaint)")
    if mask.all():
        raise UsageError(f"mask{which} is all white{where}: the whole image would be repainted and nothing kept; "
                         "use img2img (no mask) or txt2img")
