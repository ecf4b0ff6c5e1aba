"""Seeds as AUTOMATIC1111 gives them: image ``i`` of a request gets the seed ``seed + i`` and one NumPy generator
(PCG64) of its own, so one image's ``Seed:`` regenerates that image alone, whatever batch it was made in.

A1111 ``modules/processing.py`` (``process_images_inner``)::

    p.all_seeds = [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    ...
    p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]       # batch n of n_iter
    p.rng = rng.ImageRNG(shape, p.seeds, ...)                           # one generator per image

and ``get_fixed_seed``: -1 is ``int(random.randrange(4294967294))``, so a random seed is below 2**32 (a JavaScript
client's ``JSON.parse`` keeps it exact). Seeds given by the user may go up to ``request.MAX_SEED``; ``seed + i``
wraps around there.

Every random array of a generation is drawn per image, each image from its own generator, in the order a batch of
one draws it (``pipeline.py``'s module docstring): what image ``i`` gets never depends on the other images.
"""

from __future__ import annotations

import random

import numpy as np

from sdtrt.runtime.request import MAX_SEED

RANDOM_SEEDS = 4294967294  # A1111's get_fixed_seed: random.randrange(4294967294), so 0 .. 2**32 - 3


def random_seed() -> int:
    """A random seed as A1111 draws one (below 2**32)."""
    return random.SystemRandom().randrange(RANDOM_SEEDS)


def image_seeds(seed: int, count: int, first: int = 0) -> list[int]:
    """The seeds of images ``first`` .. ``first + count - 1`` of a request whose seed is ``seed``: seed + i (wrapping
    past ``MAX_SEED``)."""
    return [(seed + first + i) % (MAX_SEED + 1) for i in range(count)]


class ImageNoise:
    """One PCG64 generator per image of a batch. Every draw is ``(B, *shape)``: row ``k`` from image ``k``'s generator,
    as that image alone would draw ``(1, *shape)``."""

    def __init__(self, seeds):
        self.seeds = tuple(int(s) for s in seeds)
        self.generators = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """A new (B, *shape) float32 array of standard normal values, one row per image."""
        out = np.empty((len(self.generators), *shape), np.float32)
        self.fill(out)
        return out

    def fill(self, out: np.ndarray) -> None:
        """Draw into ``out`` (B, ...) float32, C-contiguous, in place: no allocation (the per-step noise)."""
        for generator, row in zip(self.generators, out):
            generator.standard_normal(dtype=np.float32, out=row)
