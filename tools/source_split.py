"""Split training photos by source, to validate on photos unlike the training ones (the default protocol for
choosing recipes and routers; README "Validation protocol").

    python tools/source_split.py --photos datasets/train_photos --holdout kodak --out datasets/srcsplit

A photo's source is its name's prefix before the first ``_`` (``kodak_kodim05.png``: ``kodak``), as
../shared/data/train/get_train_photos.py names them (SOURCES.md). Writes OUT/train/ and OUT/val/ as symbolic
links to the photos (nothing is copied or changed) and OUT/split.json (which source went where). The held-out
source must not be the only one. Then, e.g.:

    python tools/make_test_sets.py --input datasets/srcsplit/val --output datasets/srcsets/val \\
        --tiers full=0 --split all
"""
import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from cdnsr_plugin.utils.io import list_images, write_json


def source_of(path: Path) -> str:
    return path.name.split('_', 1)[0] if '_' in path.name else path.stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--photos', type=Path, required=True, help='folder of training photos, named SOURCE_*.png')
    parser.add_argument('--holdout', required=True, nargs='+', help='source(s) to validate on')
    parser.add_argument('--out', type=Path, required=True, help='new folder for train/ and val/')
    args = parser.parse_args(argv)
    try:
        photos = list_images(args.photos)
        sources = Counter(source_of(p) for p in photos)
        unknown = sorted(set(args.holdout) - set(sources))
        if unknown:
            raise ValueError(f'--holdout {unknown}: no such source in {args.photos} (sources: {dict(sources)})')
        if set(args.holdout) >= set(sources):
            raise ValueError('--holdout takes every source: keep at least one to train on')
        if args.out.exists():
            raise ValueError(f'--out {args.out} exists: give a new folder (nothing is replaced)')
    except (ValueError, FileNotFoundError) as exc:
        print(f'source_split: {exc}', file=sys.stderr)
        return 2
    tmp = args.out.with_name(args.out.name + '.incomplete')
    for part in ('train', 'val'):
        (tmp / part).mkdir(parents=True, exist_ok=True)
    split = {'train': [], 'val': []}
    for photo in photos:
        part = 'val' if source_of(photo) in args.holdout else 'train'
        os.symlink(os.path.relpath(photo.resolve(), (args.out / part).resolve()), tmp / part / photo.name)
        split[part].append(photo.name)
    write_json(
        tmp / 'split.json', {
            'photos': str(args.photos), 'holdout': args.holdout, 'sources': dict(sources), 'train': split['train'],
            'val': split['val']
        })
    tmp.rename(args.out)
    print(f"train: {len(split['train'])} photos of {sorted(set(sources) - set(args.holdout))}; "
          f"val: {len(split['val'])} photos of {sorted(args.holdout)}; written {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
