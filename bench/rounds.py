"""Summaries of interleaved benchmark rounds: the median, with the range beside it."""

from __future__ import annotations

import statistics


def median_range(values: list[float]) -> dict[str, float]:
    """Median, min and max of one side's rounds (what bench/RESULTS.md reports)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
