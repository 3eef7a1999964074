"""Labels and parsing of the bucket options shared by the criterion (``--recurrence-buckets``,
``--position-buckets``) and the model (``--memory-reach-buckets``)."""

import math
from typing import List, Sequence, Tuple

import torch


def bucket_label(lo, hi) -> str:
    """``(0, 1024)`` -> ``"0_1024"``, ``(4096, inf)`` -> ``"4096_end"``: the suffix of a bucket's
    logged keys."""
    return f"{lo}_{'end' if hi == math.inf else hi}"


def increasing_positive_ints(spec: str, option: str, what: str, example: str) -> List[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``, or a one-line error naming the option and the value."""
    try:
        bounds = [int(b) for b in str(spec).split(",")]
    except ValueError:
        bounds = []
    if not bounds or bounds[0] <= 0 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"{option} {spec!r}: expected increasing positive {what} separated by commas, "
            f"e.g. {example}"
        )
    return bounds


def parse_position_buckets(spec: str) -> List[Tuple[int, float]]:
    """``"1024,4096"`` -> ``[(0, 1024), (1024, 4096), (4096, inf)]``: half-open ranges of token
    positions; ``""`` -> ``[]``."""
    if not spec:
        return []
    bounds = increasing_positive_ints(spec, "--position-buckets", "token positions", "1024,4096")
    edges = [0] + bounds + [math.inf]
    return list(zip(edges[:-1], edges[1:]))


def parse_segment_buckets(spec: str, option: str = "--recurrence-buckets") -> List[Tuple[int, float]]:
    """``"1,4,16"`` -> ``[(1, 1), (2, 4), (5, 16), (17, inf)]``: inclusive ranges of segments
    back; ``""`` -> ``[]``."""
    if not spec:
        return []
    bounds = increasing_positive_ints(spec, option, "numbers of segments", "1,4,16")
    lows = [1] + [b + 1 for b in bounds]
    return list(zip(lows, bounds + [math.inf]))


def segment_label(lo, hi) -> str:
    """``(1, 1)`` -> ``"1"``, ``(2, 4)`` -> ``"2_4"``, ``(17, inf)`` -> ``"17_end"``."""
    return str(lo) if lo == hi else bucket_label(lo, hi)


def segments_back_bucket(segments_back: torch.Tensor, buckets: Sequence[Tuple[int, float]]
                         ) -> torch.Tensor:
    """Index of each value's bucket among ``buckets`` (from :func:`parse_segment_buckets`; the
    one place their edges are computed): ``(1, 1), (2, 4), (5, 16), (17, inf)`` put 1 in 0, 2-4
    in 1, 5-16 in 2 and 17 or more in 3. Values must be >= 1 (a caller masks the others)."""
    edges = torch.tensor([hi for _, hi in buckets[:-1]], device=segments_back.device)
    return torch.bucketize(segments_back, edges)  # edges[i-1] < x <= edges[i]
