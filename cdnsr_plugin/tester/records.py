"""The tester's typed records: what one run measured, before it is written anywhere.

* ``ImageRecord``: one image under one routing setting;
* ``SetRecord``: the same quantities over one dataset (``aggregate``);
* ``SettingResult``: a setting's image and set records;
* ``Comparison``: a routed setting against a baseline on one dataset (``compare``);
* ``Report``: run metadata, the settings, the comparisons, failures and notes. ``Report.to_dict`` is the
  layout of ``report.json`` (field order = key order).

FLOPs are kept per convention (``paper``: 2 x weight MACs, transposed convs on the output grid, the
ClassSR / CDNSR tables; ``macs``: ptflops MACs, what the hardware runs; see ``inference/costs.py``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

METRICS = ('psnr', 'ssim', 'psnr_y', 'ssim_y')
SPEED_BASELINES = ('backbone full image', 'backbone tiled')  # the same image; the faster one is the speed baseline


@dataclass
class Flops:
    """Cost of one image or set in one convention: the total, per tile, per tile as % of the largest branch
    on one tile (the papers' convention), and the total as % of the largest branch run on the whole image
    (the honest baseline: no tile overlap, no halo)."""

    total: float
    per_patch: Optional[float]
    percent_of_largest: Optional[float]
    percent_of_full_image: Optional[float] = None


@dataclass
class ImageRecord:
    """One image under one setting. Metrics (BasicSR's PSNR/SSIM, RGB and Y) are ``None`` without ground
    truth or for an image too small to score."""

    dataset: str
    image: str
    lr_size: list[int]
    sr_size: list[int]
    patches: int
    counts: list[int]
    eta: Optional[float]
    psnr: Optional[float]
    ssim: Optional[float]
    psnr_y: Optional[float]
    ssim_y: Optional[float]
    flops: dict[str, Flops]
    time_s: Optional[float]
    peak_memory_mb: Optional[float]
    sr_path: Optional[str] = None
    overlay_path: Optional[str] = None
    pixel_ratio: Optional[float] = None  # tiling regions: processed LR pixels (halos included) / image pixels


@dataclass
class SetRecord:
    """One setting over one dataset: counts and FLOPs summed over its images, metrics averaged."""

    dataset: str
    images: int
    patches: int
    counts: list[int]
    psnr: Optional[float]
    ssim: Optional[float]
    psnr_y: Optional[float]
    ssim_y: Optional[float]
    scored_images: int
    flops: dict[str, Flops]
    time_s: Optional[float]
    peak_memory_mb: Optional[float]


@dataclass
class SettingResult:
    """One routing setting (``argmax``, ``budget=0.50``, ``backbone full image``, ...) and its records."""

    name: str
    kind: str  # routed | backbone-full | backbone-patch
    images: list[ImageRecord] = field(default_factory=list)

    @property
    def sets(self) -> list[SetRecord]:
        return aggregate(self.images)

    def to_dict(self) -> dict[str, Any]:
        return {
            'name': self.name, 'kind': self.kind, 'images': [asdict(r) for r in self.images],
            'sets': [asdict(r) for r in self.sets]
        }


@dataclass
class Comparison:
    """A routed setting against a baseline on one dataset: ratios routed / baseline, differences
    routed - baseline (``None`` where either side lacks the value)."""

    dataset: str
    routed: str
    baseline: str
    time_ratio: Optional[float]
    flops_ratio: dict[str, Optional[float]]
    psnr_diff: Optional[float]
    psnr_y_diff: Optional[float]


@dataclass
class Failure:
    """A file that could not be used, and why (the message says what to do)."""

    file: str
    error: str


@dataclass
class Report:
    """Everything one run of ``tools/test_patches.py`` produced."""

    created: str
    command: str
    device: str
    torch: str
    threads: int
    network: dict[str, Any]
    settings: list[SettingResult]
    failures: list[Failure] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def comparison(self) -> list[Comparison]:
        """Every routed setting against each baseline setting, per dataset."""
        routed = [s for s in self.settings if s.kind == 'routed']
        return [
            row for base in self.settings if base.kind != 'routed' for setting in routed
            for row in compare(setting, base)
        ]

    @property
    def against_fastest_backbone(self) -> list[Comparison]:
        """Per routed setting and dataset, its comparison with the faster of ``backbone full image`` and
        ``backbone tiled`` (the same image; the time a user would otherwise spend); empty unless both ran."""
        entries = [c for c in self.comparison if c.baseline in SPEED_BASELINES and c.time_ratio is not None]
        if {c.baseline for c in entries} != set(SPEED_BASELINES):
            return []
        best: dict[tuple[str, str], Comparison] = {}
        for entry in entries:
            key = (entry.dataset, entry.routed)
            if key not in best or entry.time_ratio > best[key].time_ratio:  # the larger ratio: the faster baseline
                best[key] = entry
        return list(best.values())

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` layout."""
        return {
            'created': self.created, 'command': self.command, 'device': self.device, 'torch': self.torch,
            'threads': self.threads, 'network': self.network, 'settings': [s.to_dict() for s in self.settings],
            'comparison': [asdict(c) for c in self.comparison],
            'against_fastest_backbone': [asdict(c) for c in self.against_fastest_backbone],
            'failures': [asdict(f) for f in self.failures], 'notes': self.notes
        }


# ----------------------------------------------------------------------------- aggregation


def _mean_or_none(values: list[Optional[float]]) -> Optional[float]:
    scored = [value for value in values if value is not None and math.isfinite(value)]  # inf: an exact copy
    return float(sum(scored) / len(scored)) if scored else None


def _sum_counts(records: list[ImageRecord]) -> list[int]:
    lengths = {len(record.counts) for record in records}
    if len(lengths) != 1:
        raise ValueError(f'image records of dataset {records[0].dataset!r} have counts of different '
                         f'lengths {sorted(lengths)}; every record of a setting needs one count per class')
    return [int(sum(column)) for column in zip(*(record.counts for record in records))]


def _aggregate_flops(records: list[ImageRecord], patches: int) -> dict[str, Flops]:
    """Per convention: total summed; per-patch and percent weighted by each image's patches."""
    result = {}
    for convention in records[0].flops:
        entries = [record.flops[convention] for record in records]
        total = float(sum(entry.total for entry in entries))
        weighted = [(entry.percent_of_largest, record.patches) for entry, record in zip(entries, records)]
        percent = (None if patches == 0 or any(pct is None for pct, _ in weighted) else float(
            sum(pct * n for pct, n in weighted) / patches))
        full = [entry.percent_of_full_image for entry in entries]
        of_full = (None if any(not pct for pct in full) else 100.0 * total / sum(100.0 * entry.total / pct
                                                                                 for entry, pct in zip(entries, full)))
        result[convention] = Flops(total, total / patches if patches else None, percent, of_full)
    return result


def _aggregate_set(dataset: str, records: list[ImageRecord]) -> SetRecord:
    patches = int(sum(record.patches for record in records))
    metrics = {key: _mean_or_none([getattr(record, key) for record in records]) for key in METRICS}
    times = [record.time_s for record in records]
    memories = [record.peak_memory_mb for record in records if record.peak_memory_mb is not None]
    return SetRecord(
        dataset,
        len(records),
        patches,
        _sum_counts(records),
        **metrics,
        scored_images=sum(record.psnr is not None for record in records),
        flops=_aggregate_flops(records, patches),
        time_s=None if any(t is None for t in times) else float(sum(times)),
        peak_memory_mb=float(max(memories)) if memories else None)


def aggregate(images: list[ImageRecord]) -> list[SetRecord]:
    """One set record per dataset, in first-seen order.

    Metrics are means over the images that have them (``scored_images`` of them; an image has none
    without ground truth or when it is too small to score after cropping ``scale`` pixels); ``None`` if
    no image has them. FLOPs ``total`` is the sum, ``per_patch`` the sum of totals over the sum of patches
    and ``percent_of_largest`` the patch-weighted mean of the images' percents (the same thing, as every
    image shares the largest branch) -- ClassSR/CDNSR average over all patches of a set;
    ``percent_of_full_image`` is the total over the sum of the images' whole-image backbone costs. Times add up;
    peak memory is the maximum (``None`` if no image measured it).

    Raises:
        ValueError: records of one dataset count different numbers of classes.
    """
    groups: dict[str, list[ImageRecord]] = {}
    for record in images:
        groups.setdefault(record.dataset, []).append(record)
    return [_aggregate_set(dataset, records) for dataset, records in groups.items()]


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator / denominator)


def _difference(mine: Optional[float], other: Optional[float]) -> Optional[float]:
    return None if mine is None or other is None else float(mine - other)


def compare(routed: SettingResult, baseline: SettingResult) -> list[Comparison]:
    """Comparisons of a routed setting against a baseline (e.g. ``backbone full image``), one per dataset
    both have."""
    base_sets = {record.dataset: record for record in baseline.sets}
    entries = []
    for mine in routed.sets:
        other = base_sets.get(mine.dataset)
        if other is None:
            continue
        # totals over the same images (a setting keeps an image only if every setting processed it); per-tile
        # figures would not compare: the papers' tiling and the regions' cells count different tiles
        flops = {
            convention: _ratio(cost.total, other.flops[convention].total if convention in other.flops else None)
            for convention, cost in mine.flops.items()
        }
        entries.append(
            Comparison(mine.dataset, routed.name, baseline.name, _ratio(mine.time_s, other.time_s), flops,
                       _difference(mine.psnr, other.psnr), _difference(mine.psnr_y, other.psnr_y)))
    return entries
