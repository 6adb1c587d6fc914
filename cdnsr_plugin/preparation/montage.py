"""A picture of a prepared set: sample HR sub-images per class with their PSNR (like ClassSR Fig. 3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cdnsr_plugin.data.prepared_set import PreparedSet
from cdnsr_plugin.utils.io import write_image
from cdnsr_plugin.utils.viz import caption_tile, montage

NAMES = {
    2: ('simple', 'hard'), 3: ('simple', 'medium', 'hard'), 4: ('simple', 'medium', 'harder', 'hard'),
    5: ('simplest', 'simple', 'medium', 'harder', 'hard')
}


def pick_samples(labels: dict[str, tuple[int, float]], num_classes: int, per_class: int) -> list[list[str]]:
    """Per class, ``per_class`` keys spread evenly over its PSNR range (highest first)."""
    rows = []
    for label in range(num_classes):
        keys = sorted((k for k, (c, _) in labels.items() if c == label), key=lambda k: -labels[k][1])
        picks = np.linspace(0, len(keys) - 1, min(per_class, len(keys))).round().astype(int) if keys else []
        rows.append([keys[i] for i in picks])
    return rows


def write_montage(prepared: PreparedSet, out_path: Path, per_class: int = 8) -> Path:
    """Write ``out_path``: one row per class (simple at the top), HR sub-images with their PSNR."""
    num_classes, labels = prepared.num_classes, prepared.labels
    names = NAMES.get(num_classes, tuple(str(i) for i in range(num_classes)))
    rows, headers = [], []
    for label, keys in enumerate(pick_samples(labels, num_classes, per_class)):
        rows.append(
            [caption_tile(image, f'{labels[key][1]:.1f} dB') for key, image in zip(keys, prepared.images('gt', keys))])
        stats = prepared.summary['classes'][label]
        headers.append((f'class {label}', names[label], f"{stats['count']} pairs",
                        f"{stats['psnr_min']:.1f}-{stats['psnr_max']:.1f} dB"))
    reference = prepared.summary['reference'].get('kind', '?')
    title = f'HR sub-images by difficulty class (PSNR of the {reference} reference, Y channel)'
    return write_image(out_path, montage(rows, headers, title, per_row=per_class))
