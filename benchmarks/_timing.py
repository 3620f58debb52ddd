"""Small timing helpers shared by the benchmark scripts in this folder.

Everything here is plain ``time.perf_counter`` wall-clock timing: warm-up calls first, then the
median of the timed repeats. On CUDA every call is bracketed by ``torch.cuda.synchronize`` so the
time covers the kernels, not just their launch. Callers choose ``torch.inference_mode`` themselves.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed_call(fn: Callable[[], object], device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    """Wall-clock seconds of the timed repeats (warm-up calls excluded)."""

    times: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)

    def to_dict(self) -> dict:
        return {
            "median_s": self.median,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "repeats": self.repeats,
            "warmup": self.warmup,
            "times_s": self.times,
        }


def time_fn(
    fn: Callable[[], object],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 9,
    min_repeats: int = 1,
    budget_s: float | None = None,
) -> Timing:
    """Median-of-repeats timing of ``fn()``.

    ``warmup`` untimed calls run first. With ``budget_s`` the number of timed repeats adapts to the
    cost of one call: ``clamp(budget_s / t_call, min_repeats, repeats)``, where ``t_call`` is the
    last warm-up call (or the first timed call when ``warmup=0``). This keeps cheap measurements
    precise and expensive ones affordable.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    estimate = None
    for _ in range(warmup):
        estimate = _timed_call(fn, device)
    times: list[float] = []
    if estimate is None:
        times.append(_timed_call(fn, device))
        estimate = times[0]
    n = repeats
    if budget_s is not None:
        n = max(min_repeats, min(repeats, int(budget_s / max(estimate, 1e-9))))
    while len(times) < n:
        times.append(_timed_call(fn, device))
    return Timing(times=times, warmup=warmup)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 1,
    budget_s: float | None = None,
) -> dict[str, Timing]:
    """Time several functions in alternation so that load drifts on a shared machine hit them alike.

    After ``warmup`` calls of each, round ``r`` calls them in order (A, B, ...) when ``r`` is even and
    in reverse order (..., B, A) when odd (an ABBA schedule, which also cancels a linear drift).
    With ``budget_s`` the number of rounds is ``clamp(budget_s / t_round, min_repeats, repeats)``,
    ``t_round`` being the last warm-up round (or the first timed round when ``warmup=0``).
    """
    names = list(fns)
    results = {name: Timing(warmup=warmup) for name in names}
    estimate = None
    for _ in range(warmup):
        estimate = sum(_timed_call(fns[name], device) for name in names)
    rounds = repeats
    r = 0
    while r < rounds:
        for name in names if r % 2 == 0 else reversed(names):
            results[name].times.append(_timed_call(fns[name], device))
        if r == 0 and budget_s is not None:
            estimate = estimate if estimate is not None else sum(t.times[0] for t in results.values())
            rounds = max(min_repeats, min(repeats, int(budget_s / max(estimate, 1e-9))))
        r += 1
    return results


def format_seconds(seconds: float | None) -> str:
    """``0.01234`` -> ``"12.3 ms"``, ``12.3`` -> ``"12.30 s"``; ``None`` -> ``"-"``."""
    if seconds is None:
        return "-"
    if seconds < 0.9995e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 0.99995:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_table(
    header_rows: Sequence[Sequence[str]],
    rows: Sequence[Sequence[str]],
    align: str = "",
    groups: Sequence[Sequence[tuple[str, int]]] = (),
) -> str:
    """Plain-text table. ``align`` holds one ``<`` or ``>`` per column (default: first left, rest right).

    ``groups`` are extra header lines above ``header_rows`` whose cells span several columns, each a
    list of ``(text, number_of_columns)`` covering the columns left to right (text centred; use
    ``""`` for a gap). A rule separates the headers from the body.
    """
    sep = "  "
    ncol = max(len(r) for r in [*header_rows, *rows])
    align = align or "<" + ">" * (ncol - 1)
    padded = [list(r) + [""] * (ncol - len(r)) for r in [*header_rows, *rows]]
    widths = [max(len(r[c]) for r in padded) for c in range(ncol)]
    for group_row in groups:  # widen the last spanned column when a group title is wider than its span
        col = 0
        for text, span in group_row:
            have = sum(widths[col : col + span]) + len(sep) * (span - 1)
            if len(text) > have:
                widths[col + span - 1] += len(text) - have
            col += span

    def line(cells):
        return sep.join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths)).rstrip()

    def group_line(group_row):
        out, col = [], 0
        for text, span in group_row:
            out.append(f"{text:^{sum(widths[col : col + span]) + len(sep) * (span - 1)}}")
            col += span
        return sep.join(out).rstrip()

    head = [group_line(g) for g in groups] + [line(r) for r in padded[: len(header_rows)]]
    body = [line(r) for r in padded[len(header_rows) :]]
    rule = "-" * max(len(x) for x in head + body)
    return "\n".join([*head, rule, *body])


def environment_info(device: str | torch.device) -> dict:
    """Versions, threads, device name and load average, for the record next to the numbers."""
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    return info


__all__ = [
    "Timing",
    "environment_info",
    "format_seconds",
    "format_table",
    "synchronize",
    "time_fn",
    "time_interleaved",
]


def write_json(path, results: dict) -> str:
    """Write a benchmark's results as indented JSON (creating the folder); returns the path written."""
    from cloc_data.json_io import write_json_atomic

    return str(write_json_atomic(path, results, indent=2, default=str))
