"""The dataset of prepared, difficulty-labelled sub-image pairs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.registry import DATASET_REGISTRY

from cdnsr_plugin.registry import register

SUMMARY, LABELS = 'summary.json', 'labels.txt'


def read_labels(path: Path) -> dict[str, tuple[int, float]]:
    """``key -> (label, psnr)`` from a ``labels.txt`` written by tools/prepare_data.py."""
    labels = {}
    with open(path, encoding='ascii') as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split()
            if len(parts) != 3:
                raise ValueError(f'{path}:{number}: expected "key label psnr", got {line.strip()!r}')
            labels[parts[0]] = (int(parts[1]), float(parts[2]))
    return labels


def check_complete(root: Path) -> dict:
    """The summary of a finished ``prepare_data`` run in ``root``; an error for anything else."""
    summary_path = root / SUMMARY
    if not summary_path.is_file():
        raise FileNotFoundError(f'{root} is not a complete prepared set ({SUMMARY} is missing): run '
                                'tools/prepare_data.py to the end; an interrupted run leaves only a '
                                '*.incomplete folder')
    summary = json.loads(summary_path.read_text())
    if summary.get('complete') is not True:
        raise ValueError(f'{summary_path} does not mark the set complete; prepare it again')
    return summary


@register(DATASET_REGISTRY)
class DifficultyPairedDataset(PairedImageDataset):
    """Paired LR/HR sub-images with their difficulty class, from ``tools/prepare_data.py`` LMDBs.

    A ``PairedImageDataset`` (BasicSR's LMDB reading with a lazily opened ``FileClient``, random crop,
    flips and rotations) that also returns ``label`` (0 = simple ... M-1 = hard), ``psnr`` (the
    reference's PSNR that set the label) and ``key``. ``classes`` restricts it to some classes, e.g.
    ``[0]`` to pre-train the smallest branch (ClassSR Sec. 3.7, CDNSR Sec. III-D).

    Options (besides PairedImageDataset's ``dataroot_gt``, ``dataroot_lq``, ``io_backend: {type: lmdb}``,
    ``gt_size``, ``use_hflip``, ``use_rot``):
        label_file: path of ``labels.txt``; default: the one beside the LMDBs.
        classes: list of class labels to keep; default: all.

    Raises:
        FileNotFoundError: the set is missing or incomplete (interrupted preparation).
        ValueError: not LMDB, labels missing for some keys, or an unknown class requested.
    """

    def __init__(self, opt: dict[str, Any]) -> None:
        if opt.get('io_backend', {}).get('type') != 'lmdb':
            raise ValueError(f"{opt.get('name', 'dataset')}: DifficultyPairedDataset reads LMDBs; "
                             'set io_backend: {type: lmdb}')
        root = Path(opt['dataroot_lq']).parent
        self.summary = check_complete(root)
        super().__init__(opt)
        label_path = Path(opt.get('label_file') or root / LABELS)
        labels = read_labels(label_path)
        missing = [p['lq_path'] for p in self.paths if p['lq_path'] not in labels]
        if missing:
            raise ValueError(f'{label_path} has no label for {len(missing)} keys (e.g. {missing[0]}); '
                             'it does not belong to these LMDBs')
        self.paths = self._keep_classes(opt.get('classes'), labels)
        self.labels = [labels[p['lq_path']][0] for p in self.paths]
        self.psnr = [labels[p['lq_path']][1] for p in self.paths]

    def _keep_classes(self, classes: Any, labels: dict[str, tuple[int, float]]) -> list[dict]:
        if classes is None:
            return self.paths
        wanted = {int(c) for c in (classes if isinstance(classes, (list, tuple)) else [classes])}
        unknown = wanted - set(range(self.summary['num_classes']))
        if unknown:
            raise ValueError(f"classes: {sorted(unknown)} not in 0..{self.summary['num_classes'] - 1}")
        return [p for p in self.paths if labels[p['lq_path']][0] in wanted]

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = super().__getitem__(index)
        data.update(label=self.labels[index], psnr=self.psnr[index], key=self.paths[index]['lq_path'])
        return data
