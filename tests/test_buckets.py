import math

import pytest

from pixrun.data.buckets import bucket_name, make_buckets, nearest_bucket, parse_bucket


@pytest.mark.parametrize("resolution, patch", [(512, 32), (1024, 32), (64, 16), (256, 16)])
def test_buckets_have_patch_multiple_sides_and_about_equal_area(resolution, patch):
    buckets = make_buckets(resolution, patch)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % patch == 0 and height % patch == 0
        assert 0.5 <= width / height <= 2.0
        tokens = (width // patch) * (height // patch)
        # Rounding the long side to whole patches moves the token count by at most half a row.
        assert abs(tokens - (resolution // patch) ** 2) <= (max(width, height) // patch) / 2
        assert (height, width) in buckets  # as many landscape as portrait buckets


def test_512_buckets_span_the_ratio_range():
    ratios = [w / h for w, h in make_buckets(512, 32)]
    assert ratios == sorted(ratios)
    assert ratios[0] < 0.6 and ratios[-1] > 1.7
    assert len(ratios) >= 7


def test_patch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        make_buckets(500, 32)


@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (1000, 1000), (4000, 3000), (300, 900), (5000, 100)])
def test_nearest_bucket_has_the_closest_aspect_ratio(size):
    buckets = make_buckets(512, 32)
    chosen = nearest_bucket(*size, buckets)
    distance = lambda b: abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1]))
    assert all(distance(chosen) <= distance(other) for other in buckets)


def test_nearest_bucket_examples():
    buckets = make_buckets(512, 32)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(1920, 1080, buckets) == (672, 384)
    assert nearest_bucket(100, 5000, buckets) == (384, 672)  # beyond the range: the most extreme bucket


def test_bucket_names_round_trip():
    for bucket in make_buckets(512, 32):
        assert parse_bucket(bucket_name(bucket)) == bucket
