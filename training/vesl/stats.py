"""Per-chunk statistics of a VESL run and their summary (``vesl_stats.json``, the CLI's report)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

STAGES = ("load", "caption", "phrases", "ground", "write")


@dataclass
class ChunkStats:
    chunk: int
    shard: str | None = None  # file name inside the output folder; None when no sample survived
    images: int = 0  # samples written
    phrases: int = 0
    regions: int = 0
    images_without_phrases: int = 0
    images_without_regions: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    stage_images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    skipped: dict[str, int] = field(default_factory=dict)

    def count_written(self, num_phrases: int, num_regions: int) -> None:
        self.images += 1
        self.phrases += num_phrases
        self.regions += num_regions
        self.images_without_phrases += int(num_phrases == 0)
        self.images_without_regions += int(num_regions == 0)

    def add_time(self, stage: str, start: float, images: int) -> None:
        self.seconds[stage] += time.perf_counter() - start
        self.stage_images[stage] += images


def summarize(chunk_stats: Iterable[dict[str, Any]], num_chunks: int) -> dict[str, Any]:
    """Sum per-chunk statistics into the run summary written as ``vesl_stats.json``.

    ``images_per_second`` is per stage and per process (images through the stage / seconds spent in
    it, summed over chunks), so it measures one device's throughput whatever the number of processes.
    """
    total: dict[str, Any] = {
        "chunks_total": num_chunks,
        "chunks_finished": 0,
        "images": 0,
        "phrases": 0,
        "regions": 0,
        "images_without_phrases": 0,
        "images_without_regions": 0,
        "seconds": dict.fromkeys(STAGES, 0.0),
        "stage_images": dict.fromkeys(STAGES, 0),
        "skipped": {},
    }
    for stats in chunk_stats:
        total["chunks_finished"] += 1
        for key in ("images", "phrases", "regions", "images_without_phrases", "images_without_regions"):
            total[key] += stats[key]
        for stage in STAGES:
            total["seconds"][stage] += stats["seconds"].get(stage, 0.0)
            total["stage_images"][stage] += stats["stage_images"].get(stage, 0)
        for reason, count in stats["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + count
    total["skipped_total"] = sum(total["skipped"].values())
    total["images_per_second"] = {
        stage: (
            total["stage_images"][stage] / total["seconds"][stage] if total["seconds"][stage] > 0 else None
        )
        for stage in STAGES
    }
    images = total["images"]
    total["phrases_per_caption"] = total["phrases"] / images if images else 0.0
    total["regions_per_image"] = total["regions"] / images if images else 0.0
    return total


def format_stats(stats: dict[str, Any]) -> str:
    """The summary as a few readable lines (what the CLI prints)."""
    lines = [
        f"VESL: {stats['chunks_finished']}/{stats['chunks_total']} chunks finished, "
        f"{stats['images']} images labelled, {stats['skipped_total']} skipped",
        f"  phrases per caption {stats['phrases_per_caption']:.2f}, regions per image "
        f"{stats['regions_per_image']:.2f} ({stats['images_without_phrases']} images without phrases, "
        f"{stats['images_without_regions']} without regions)",
        "  stage       images    seconds   images/s",
    ]
    for stage in STAGES:
        rate = stats["images_per_second"][stage]
        lines.append(
            f"  {stage:<9} {stats['stage_images'][stage]:>8} {stats['seconds'][stage]:>10.2f} "
            f"{'-' if rate is None else f'{rate:.2f}':>10}"
        )
    for reason, count in sorted(stats["skipped"].items()):
        lines.append(f"  skipped {reason}: {count}")
    return "\n".join(lines)
