"""The prepared-set format: the ONE reader and writer of what ``tools/prepare_data.py`` makes.

A prepared set is a folder with

* ``lq.lmdb``, ``gt.lmdb``: BasicSR LMDBs (``basicsr.utils.lmdb_util.LmdbMaker``: PNG bytes of BGR images,
  ``meta_info.txt``), so BasicSR's own ``PairedImageDataset`` with ``io_backend: lmdb`` reads them;
* ``labels.txt``: one line ``key label psnr`` per pair (label 0 = simple ... M-1 = hard);
* ``summary.json``: ``complete: true`` (written last), ``format_version``, ``num_classes``, per-class
  statistics, the reference network, the options, skipped files; the file names of the three above.

Everything else (the dataset, the Laplacian router's fitting, the montage, the builder) goes through
this module, so the format is defined in one place.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cdnsr_plugin.utils.io import decode_image, write_json

SUMMARY, LABELS, LQ_LMDB, GT_LMDB = 'summary.json', 'labels.txt', 'lq.lmdb', 'gt.lmdb'
FORMAT_VERSION = 1


def read_labels(path: Path | str, num_classes: Optional[int] = None) -> dict[str, tuple[int, float]]:
    """``key -> (label, psnr)`` from a ``labels.txt``.

    Raises:
        ValueError: a line is not ``key label psnr``, or (with ``num_classes``) a label lies outside
            ``[0, num_classes)``; the message names the file and line.
    """
    labels = {}
    with open(path, encoding='ascii') as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split()
            try:
                key, label, psnr = parts[0], int(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                raise ValueError(f'{path}:{number}: expected "key label psnr", got {line.strip()!r}') from None
            if len(parts) != 3:
                raise ValueError(f'{path}:{number}: expected "key label psnr", got {line.strip()!r}')
            if num_classes is not None and not 0 <= label < num_classes:
                raise ValueError(f'{path}:{number}: label {label} of {key} is outside 0..{num_classes - 1}; '
                                 'the labels do not belong to this set, prepare it again')
            labels[key] = (label, psnr)
    return labels


def write_labels(path: Path, keys: Sequence[str], labels: np.ndarray, psnr: np.ndarray) -> None:
    """``labels.txt``: ``key label psnr`` per pair, in the order given."""
    with open(path, 'w', encoding='ascii') as handle:
        for key, label, value in zip(keys, labels, psnr):
            handle.write(f'{key} {int(label)} {float(value):.4f}\n')


def read_summary(root: Path | str) -> dict:
    """The summary of a finished preparation in ``root``; an error for anything else.

    Raises:
        FileNotFoundError: no ``summary.json`` (missing folder, or an interrupted run).
        ValueError: the summary does not mark the set complete.
    """
    summary_path = Path(root) / SUMMARY
    if not summary_path.is_file():
        raise FileNotFoundError(f'{root} is not a complete prepared set ({SUMMARY} is missing): run '
                                'tools/prepare_data.py to the end; an interrupted run leaves only a '
                                '*.incomplete folder')
    summary = json.loads(summary_path.read_text())
    if summary.get('complete') is not True:
        raise ValueError(f'{summary_path} does not mark the set complete; prepare it again')
    return summary


def write_summary(root: Path, summary: dict) -> dict:
    """Write ``summary.json`` with the format fields (``complete``, ``format_version``, the file names) set by
    this module whatever ``summary`` holds, and return it; write it last, as it marks the set complete."""
    owned = ('complete', 'format_version', 'lq', 'gt', 'labels')
    kept = {key: value for key, value in summary.items() if key not in owned}
    full = {'complete': True, 'format_version': FORMAT_VERSION, **kept, 'lq': LQ_LMDB, 'gt': GT_LMDB, 'labels': LABELS}
    write_json(root / SUMMARY, full)
    return full


class PreparedSet:
    """A complete prepared set, read-only.

    Args:
        root: the folder ``tools/prepare_data.py`` wrote.

    Raises:
        FileNotFoundError, ValueError: as ``read_summary``.

    Examples:
        >>> prepared = PreparedSet('datasets/DIV2K_CDNSR_x4')          # doctest: +SKIP
        >>> key, (label, psnr) = next(iter(prepared.labels.items()))   # doctest: +SKIP
        >>> lr = next(prepared.images('lq', [key]))                     # doctest: +SKIP
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.summary = read_summary(self.root)

    @property
    def num_classes(self) -> int:
        return int(self.summary['num_classes'])

    @property
    def lq_path(self) -> Path:
        return self.root / self.summary.get('lq', LQ_LMDB)

    @property
    def gt_path(self) -> Path:
        return self.root / self.summary.get('gt', GT_LMDB)

    @property
    def labels_path(self) -> Path:
        return self.root / self.summary.get('labels', LABELS)

    @cached_property
    def labels(self) -> dict[str, tuple[int, float]]:
        """``key -> (label, psnr)`` of every pair, labels checked against ``num_classes``."""
        return read_labels(self.labels_path, self.num_classes)

    def images(self, which: str, keys: Sequence[str]) -> Iterator[np.ndarray]:
        """The ``lq`` or ``gt`` sub-images stored under ``keys``, as uint8 BGR arrays, in order.

        Raises:
            FileNotFoundError: the LMDB is missing.
            ValueError: a key is not in the LMDB, or its bytes are not an image.
        """
        import lmdb
        path = {'lq': self.lq_path, 'gt': self.gt_path}[which]
        if not path.is_dir():
            raise FileNotFoundError(f'{path}: no {which} LMDB; the prepared set is incomplete, prepare it again')
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
        try:
            with env.begin() as txn:
                for key in keys:
                    image = decode_image(txn.get(key.encode('ascii')))
                    if image is None:
                        raise ValueError(f'{path}: key {key!r} from {self.labels_path.name} is missing or not an '
                                         f'image; {self.labels_path.name} does not belong to this LMDB')
                    yield image
        finally:
            env.close()
