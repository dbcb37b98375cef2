"""Aspect-ratio bucketing with kohya's options: images of similar shape train together at a size near their own.

Buckets are the sizes (w, h), both multiples of `bucket_reso_steps` within [min_bucket_reso, max_bucket_reso],
whose area does not exceed the training resolution's area, taking for each width the tallest such height (and the
transposes). Each image goes to the bucket whose aspect ratio is closest to its own. With `bucket_no_upscale`, an
image smaller than the training area gets a bucket of its own size (rounded down to the steps) instead, so it is
never enlarged. Batches are drawn within one bucket; images are resized to cover their bucket and center-cropped.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

from .config import ConfigError

log = logging.getLogger("mole.trainer")


@dataclass(frozen=True)
class BucketSettings:
    resolution: tuple[int, int]
    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False

    def __post_init__(self):
        if self.steps < 8 or self.steps % 8:
            raise ConfigError(f"bucket_reso_steps {self.steps}: must be a multiple of 8")
        if not self.steps <= self.min_reso <= self.max_reso:
            raise ConfigError(f"bucket sizes: need bucket_reso_steps <= min_bucket_reso <= max_bucket_reso, got "
                              f"{self.steps}, {self.min_reso}, {self.max_reso}")
        if self.min_reso % self.steps or self.max_reso % self.steps:
            raise ConfigError("min_bucket_reso and max_bucket_reso must be multiples of bucket_reso_steps")


def bucket_sizes(s: BucketSettings) -> list[tuple[int, int]]:
    """All bucket sizes (w, h), sorted by aspect ratio."""
    area = s.resolution[0] * s.resolution[1]
    sizes = set()
    side = max(s.min_reso, min(s.max_reso, int(math.sqrt(area)) // s.steps * s.steps))
    sizes.add((side, side))
    for w in range(s.min_reso, s.max_reso + 1, s.steps):
        h = min(s.max_reso, area // w // s.steps * s.steps)
        if h >= s.min_reso:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def assign(image_size: tuple[int, int], sizes: list[tuple[int, int]], s: BucketSettings) -> tuple[int, int]:
    """The bucket of an image of `image_size` (w, h)."""
    w, h = image_size
    if s.no_upscale and w * h <= s.resolution[0] * s.resolution[1]:
        bw, bh = max(s.steps, w // s.steps * s.steps), max(s.steps, h // s.steps * s.steps)
        return bw, bh
    ratio = w / h
    return min(sizes, key=lambda wh: (abs(math.log(wh[0] / wh[1] / ratio)), -wh[0] * wh[1]))


def summary(assigned: list[tuple[int, int]]) -> str:
    counts = Counter(assigned)
    lines = [f"  {w}x{h}: {n} image(s)" for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1])]
    return f"{len(counts)} bucket(s) in use:\n" + "\n".join(lines)
