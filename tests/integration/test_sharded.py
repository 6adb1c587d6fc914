"""Inference over two processes with torchrun (gloo, CPU): the same SR images, byte for byte, and the same per-image
figures as one process; one eta over all images for --set-budget; a failed image listed in the one report
(``tester.shard``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow
TIMING = {'time_s', 'peak_memory_mb', 'sr_path', 'overlay_path'}  # what may differ between runs (and --out)


def run_tester(root: Path, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    args = [
        str(REPO / 'tools' / 'test_patches.py'), '--input',
        str(root / 'lr'), '--gt',
        str(root / 'hr'), '--checkpoint',
        str(root / 'net.pth'), '--network',
        str(root / 'net.yml'), '--scale', '4', '--out',
        str(out), '--threads', '1', *extra
    ]
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
                str(processes), '--standalone'] if processes > 1 else [sys.executable]
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    return subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=600)


def images(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob('*.png')) if p.name != 'psnr_flops.png'
    }


def content(report: dict) -> dict:
    """The report's settings, failures and notes without what depends on the run (timings, the output paths)."""

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in TIMING}
        if isinstance(value, list):
            return [untimed(v) for v in value]
        return _untimed(value) if isinstance(value, str) else value

    return untimed({key: report[key] for key in ('settings', 'failures', 'notes')})


def _untimed(note: str) -> str:
    return note.split(' s to solve)')[0].rsplit('(', 1)[0] if 's to solve)' in note else note


@pytest.fixture(scope='module')
def folder(setup, tmp_path_factory) -> Path:
    """The tester's pairs plus a file that is not a usable image (listed as a failure by whichever rank runs it)."""
    root, _ = setup
    copy = tmp_path_factory.mktemp('sharded')
    for name in ('lr', 'hr'):
        shutil.copytree(root / name, copy / name)
    for name in ('net.pth', 'net.yml'):
        shutil.copy(root / name, copy / name)
    (copy / 'lr' / 'f_broken.png').write_bytes(b'not a png')
    return copy


def test_two_processes_give_the_images_and_report_of_one(folder, tmp_path):
    same = ('--set-budget', '0.6', '--compare-backbone', '--tile', '48')  # a set tile: measured, it may differ
    one = run_tester(folder, tmp_path / 'one', *same)
    two = run_tester(folder, tmp_path / 'two', *same, processes=2)
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-4000:]  # the broken file fails, the rest run
    assert images(tmp_path / 'two') == images(tmp_path / 'one') and len(images(tmp_path / 'one')) == 2 * 5
    first = json.loads((tmp_path / 'one' / 'report.json').read_text())
    second = json.loads((tmp_path / 'two' / 'report.json').read_text())
    assert content(second) == content(first)
    assert [f['file'] for f in second['failures']] == [str(folder / 'lr' / 'f_broken.png')]
    etas = {record['eta'] for record in second['settings'][0]['images']}
    assert len(etas) == 1  # one eta over the images of both ranks
    assert not (tmp_path / 'two' / 'run_in_progress.json').exists() and not (tmp_path / 'two.lock').exists()
    assert two.stdout.count('Reports:') == 1  # rank 0 alone reports


# the tester, except that rank 1 is killed (SIGKILL) right after writing its first image
DYING_RANK = """
import os, signal, sys
from cdnsr_plugin.tester import run
from cdnsr_plugin.tester.cli import main
save = run.Runner.save_images
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if self.shard.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
run.Runner.save_images = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_rank_leaves_no_report_and_overwrite_replaces_the_run(folder, tmp_path):
    script = tmp_path / 'dying.py'
    script.write_text(DYING_RANK)
    out = tmp_path / 'killed'
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    args = [
        '--input',
        str(folder / 'lr'), '--checkpoint',
        str(folder / 'net.pth'), '--network',
        str(folder / 'net.yml'), '--scale', '4', '--out',
        str(out), '--threads', '1'
    ]
    killed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
         str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600)
    assert killed.returncode != 0
    assert not (out / 'report.json').exists() and not (out / 'report.csv').exists()
    listed = json.loads((out / 'run_in_progress.json').read_text())['outputs']
    assert set(listed) >= {str(p.relative_to(out)) for p in out.rglob('*.png')}  # all it wrote is listed
    again = run_tester(folder, out, '--overwrite', processes=2)
    assert again.returncode == 1, again.stderr[-3000:]  # the broken file still fails; every other image runs
    report = json.loads((out / 'report.json').read_text())
    assert len(report['settings'][0]['images']) == 5 and not (out / 'run_in_progress.json').exists()
