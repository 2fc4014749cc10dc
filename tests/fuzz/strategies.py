"""Strategies shared by the property tests: byte streams and the reads they arrive in."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import strategies as st


@st.composite
def pieces(draw: st.DrawFn, data: bytes, max_cuts: int = 12) -> list[bytes]:
    """`data` cut at arbitrary points, as a relay's reads would bring it (every piece non-empty)."""
    if len(data) < 2:
        return [data] if data else []
    cuts = draw(st.lists(st.integers(1, len(data) - 1), max_size=max_cuts, unique=True))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at `cuts` (positions modulo its length, duplicates ignored)."""
    if len(data) < 2:
        return [data] if data else []
    points = sorted({1 + c % (len(data) - 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


cut_points = st.lists(st.integers(0, 1 << 30), max_size=12)
