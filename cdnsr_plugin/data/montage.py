"""A picture of a prepared set: sample HR sub-images per class with their PSNR (like ClassSR Fig. 3)."""
from __future__ import annotations

from pathlib import Path

import cv2
import lmdb
import numpy as np

from cdnsr_plugin.data.difficulty_dataset import read_labels

TILE = 128
NAMES = {2: ('simple', 'hard'), 3: ('simple', 'medium', 'hard'), 4: ('simple', 'medium', 'harder', 'hard'),
         5: ('simplest', 'simple', 'medium', 'harder', 'hard')}


def pick_samples(labels: dict[str, tuple[int, float]], num_classes: int, per_class: int) -> list[list[str]]:
    """Per class, ``per_class`` keys spread evenly over its PSNR range (highest first)."""
    rows = []
    for label in range(num_classes):
        keys = sorted((k for k, (c, _) in labels.items() if c == label), key=lambda k: -labels[k][1])
        picks = np.linspace(0, len(keys) - 1, min(per_class, len(keys))).round().astype(int) if keys else []
        rows.append([keys[i] for i in picks])
    return rows


def _tile(data: bytes, psnr: float) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (TILE, TILE), interpolation=cv2.INTER_NEAREST)
    cv2.rectangle(img, (0, TILE - 18), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(img, f'{psnr:.1f} dB', (4, TILE - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def write_montage(root: Path, summary: dict, out_path: Path, per_class: int = 8) -> None:
    """Write ``out_path``: one row per class (simple at the top), HR sub-images with their PSNR."""
    num_classes = summary['num_classes']
    labels = read_labels(root / summary['labels'])
    names = NAMES.get(num_classes, tuple(str(i) for i in range(num_classes)))
    rows = []
    env = lmdb.open(str(root / summary['gt']), readonly=True, lock=False, readahead=False)
    with env.begin() as txn:
        for label, keys in enumerate(pick_samples(labels, num_classes, per_class)):
            tiles = [_tile(txn.get(key.encode('ascii')), labels[key][1]) for key in keys]
            tiles += [np.zeros((TILE, TILE, 3), np.uint8)] * (per_class - len(tiles))
            header = np.full((TILE, 150, 3), 255, np.uint8)
            stats = summary['classes'][label]
            for line, text in enumerate((f'class {label}', names[label], f"{stats['count']} pairs",
                                         f"{stats['psnr_min']:.1f}-{stats['psnr_max']:.1f} dB")):
                cv2.putText(header, text, (6, 28 + 26 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                            cv2.LINE_AA)
            rows.append(np.hstack([header] + tiles))
    env.close()
    title = np.full((34, rows[0].shape[1], 3), 255, np.uint8)
    reference = summary['reference'].get('kind', '?')
    cv2.putText(title, f'HR sub-images by difficulty class (PSNR of the {reference} reference, Y channel)',
                (6, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(out_path), np.vstack([title] + rows)):
        raise OSError(f'could not write {out_path}')
