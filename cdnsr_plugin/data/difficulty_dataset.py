"""The dataset of prepared, difficulty-labelled sub-image pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.registry import DATASET_REGISTRY

from cdnsr_plugin.data.prepared_set import PreparedSet, read_labels
from cdnsr_plugin.registry import register


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
        prepared = PreparedSet(Path(opt['dataroot_lq']).parent)
        self.summary = prepared.summary
        super().__init__(opt)
        label_path = Path(opt['label_file']) if opt.get('label_file') else prepared.labels_path
        labels = read_labels(label_path, prepared.num_classes)
        missing = [p['lq_path'] for p in self.paths if p['lq_path'] not in labels]
        if missing:
            raise ValueError(f'{label_path} has no label for {len(missing)} keys (e.g. {missing[0]}); '
                             'it does not belong to these LMDBs')
        self.paths = self._keep_classes(opt.get('classes'), labels, prepared.num_classes)
        self.labels = [labels[p['lq_path']][0] for p in self.paths]
        self.psnr = [labels[p['lq_path']][1] for p in self.paths]

    def _keep_classes(self, classes: Any, labels: dict[str, tuple[int, float]], num_classes: int) -> list[dict]:
        if classes is None:
            return self.paths
        wanted = {int(c) for c in (classes if isinstance(classes, (list, tuple)) else [classes])}
        unknown = wanted - set(range(num_classes))
        if unknown:
            raise ValueError(f"classes: {sorted(unknown)} not in 0..{num_classes - 1}")
        return [p for p in self.paths if labels[p['lq_path']][0] in wanted]

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = super().__getitem__(index)
        data.update(label=self.labels[index], psnr=self.psnr[index], key=self.paths[index]['lq_path'])
        return data
