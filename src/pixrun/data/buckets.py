"""Aspect-ratio buckets: image sizes of about the same token count, for batches of one shape each.

A bucket is a (width, height) pair whose sides are multiples of the patch size and whose area is about
resolution², so every bucket costs about the same per image. Buckets are named "WxH" in shards and indexes.
"""

import math


def make_buckets(
    resolution: int, patch_size: int, min_ratio: float = 0.5, max_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """All (width, height) buckets with width/height in [min_ratio, max_ratio], sorted by aspect ratio."""
    if resolution % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide resolution {resolution}")
    tokens = (resolution // patch_size) ** 2
    buckets = set()
    # Landscape buckets mirror portrait ones, so neither orientation gets finer steps than the other.
    for short in range(1, math.isqrt(tokens) + 1):
        long = round(tokens / short)
        portrait, landscape = (short * patch_size, long * patch_size), (long * patch_size, short * patch_size)
        for width, height in (portrait, landscape):
            if min_ratio <= width / height <= max_ratio:
                buckets.add((width, height))
    return sorted(buckets, key=lambda size: size[0] / size[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio, so 1:2 and 2:1 are as far from 1:1)."""
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda size: abs(math.log(size[0] / size[1]) - log_ratio))


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket(name: str) -> tuple[int, int]:
    width, _, height = name.partition("x")
    return int(width), int(height)
