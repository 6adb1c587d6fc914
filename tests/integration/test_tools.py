"""The command-line tools as users run them, in subprocesses: count_flops, prepare_data (also killed
mid-run), make_test_sets with worker processes, and test_patches against BasicSR's own test pipeline."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from cdnsr_plugin.data.difficulty_dataset import DifficultyPairedDataset

from helpers import REPO, TESTER_NETWORK, TIER_CROPS, TIERS, WIDTHS, matlab_bicubic, read_png

pytestmark = pytest.mark.slow


def test_count_flops_json_cli():
    out = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'count_flops.py'), '-opt',
        str(REPO / 'options' / 'networks' / 'CDNSR_FSRCNN_x4.yml'), '--json'
    ],
                         capture_output=True,
                         text=True,
                         check=True,
                         cwd=REPO).stdout
    data = json.loads(out)
    assert [b['name'] for b in data['branches']] == ['FSRCNN(d=16)', 'FSRCNN(d=36)', 'FSRCNN(d=56)']
    assert data['branches'][2]['percent_of_largest'] == {'paper': 100.0, 'macs': 100.0}
    assert data['branches'][0]['paper_flops'] == pytest.approx(141e6, rel=0.01)
    assert 25 < data['branches'][0]['percent_of_largest']['paper'] < 35
    assert set(data['branches'][0]) >= {'name', 'macs', 'paper_flops', 'percent_of_largest'}


def test_count_flops_cli_names_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'count_flops.py'), '-opt',
         str(tmp_path / 'nope.yml')],
        capture_output=True,
        text=True)
    assert result.returncode != 0 and 'nope.yml' in result.stderr and 'does not exist' in result.stderr


def test_killed_run_leaves_nothing_the_dataset_accepts(tmp_path, photos):
    folder = tmp_path / 'big'
    folder.mkdir()
    for i, photo in enumerate(photos):
        cv2.imwrite(str(folder / f'{i}.png'), photo)
    out = tmp_path / 'set'
    incomplete = tmp_path / 'set.incomplete'
    command = [
        sys.executable,
        str(REPO / 'tools' / 'prepare_data.py'), '--input',
        str(folder), '--output',
        str(out), '--reference', 'bicubic', '--workers', '0', '--compress-level', '9'
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (incomplete / 'gt.lmdb').exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert incomplete.is_dir() and not out.exists()
    for root in (out, incomplete):
        with pytest.raises(FileNotFoundError, match='not a complete prepared set'):
            DifficultyPairedDataset({
                'name': 'p', 'dataroot_gt': str(root / 'gt.lmdb'), 'dataroot_lq': str(root / 'lq.lmdb'),
                'io_backend': {'type': 'lmdb'}, 'phase': 'train', 'scale': 4
            })


def test_cli_with_worker_processes(tmp_path, hr_folder):
    out = tmp_path / 'cli_set'
    result = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'prepare_data.py'), '--input',
        str(hr_folder), '--output',
        str(out), '--reference', 'bicubic', '--classes', '2', '--workers', '2'
    ],
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['num_classes'] == 2 and f"{summary['num_pairs']} sub-image pairs" in result.stdout
    missing = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'prepare_data.py'), '--input',
        str(hr_folder), '--output',
        str(tmp_path / 'x')
    ],
                             capture_output=True,
                             text=True,
                             timeout=300)
    assert missing.returncode == 2 and 'choose exactly one reference' in missing.stderr


def test_cli_split_all_in_worker_processes(hr_dir, tmp_path):
    """The CLI as a program: --split all puts every image in every tier; --workers 2 uses processes."""
    out = tmp_path / 'all'
    run = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'make_test_sets.py'), '--input',
        str(hr_dir), '--output',
        str(out), '--tiers', TIERS, '--split', 'all', '--scale', '2', '--workers', '2'
    ],
                         capture_output=True,
                         text=True,
                         cwd=REPO,
                         env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert run.returncode == 0, run.stderr
    assert all(f'Test{tier}: {len(TIER_CROPS)} images' in run.stdout for tier in WIDTHS)
    summary = json.loads((out / 'summary.json').read_text())
    every = sorted(p.name for p in hr_dir.iterdir())
    for tier, width in WIDTHS.items():
        assert [e['name'] for e in summary['tiers'][tier]['images']] == every
        folder = out / f'Test{tier}'
        assert sorted(p.name for p in (folder / 'HR').iterdir()) == every
        for entry in summary['tiers'][tier]['images']:
            src_w = read_png(hr_dir / entry['source']).shape[1]
            hr, lr = read_png(folder / 'HR' / entry['name']), read_png(folder / 'LR_bicubic' / 'X2' / entry['name'])
            assert hr.shape[1] == (width if 0 < width < src_w else src_w) // 2 * 2 and hr.shape[0] % 2 == 0
            np.testing.assert_array_equal(lr, matlab_bicubic(hr, 1 / 2))
    assert not out.with_name('all.incomplete').exists()


def test_option_file_mode_and_basicsr_test_pipeline_share_the_file(setup, tmp_path):
    root, _ = setup
    for kind in ('lr', 'hr'):  # BasicSR's SSIM needs images of at least 11 pixels after the crop
        (tmp_path / kind).mkdir()
        for name in ('a_97x250', 'd_200x260'):
            shutil.copy(root / kind / f'{name}.png', tmp_path / kind)
    opt = yaml.safe_load((REPO / 'options' / 'test' / 'test_CDNSR_FSRCNN.yml').read_text())
    opt['network_g'] = TESTER_NETWORK
    opt['num_gpu'] = 0
    opt['datasets'] = {
        'test_1': {
            'name': 'mini', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp_path / 'hr'),
            'dataroot_lq': str(tmp_path / 'lr'), 'io_backend': {'type': 'disk'}
        }
    }
    opt['path'] = {'pretrain_network_g': str(root / 'net.pth'), 'param_key_g': 'params', 'strict_load_g': True}
    opt_file = tmp_path / 'test.yml'
    opt_file.write_text(yaml.safe_dump(opt))
    result = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'test_patches.py'), '-opt',
         str(opt_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / 'results' / opt['name'] / 'report.json').read_text())
    ours = {r['image']: r['psnr_y'] for r in report['settings'][0]['images']}
    result = subprocess.run([sys.executable, '-m', 'cdnsr_plugin.test', '-opt',
                             str(opt_file)],
                            cwd=tmp_path,
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = next((tmp_path / 'results' / opt['name']).glob('test_*.log')).read_text()
    # BasicSR's validation (Y PSNR, crop 4) of the same routed model and images gives the same mean
    logged = float(log.split('# psnr:')[1].split()[0])
    assert logged == pytest.approx(np.mean(list(ours.values())), abs=1e-3)


def test_prune_branches_writes_part_checkpoints_that_load(tmp_path):
    import torch
    from basicsr.archs import build_network

    from cdnsr_plugin.archs.pruning import prune
    from cdnsr_plugin.utils.checkpoint import load_parts
    torch.manual_seed(0)
    largest = build_network({'type': 'FSRCNN', 'd': 56, 's': 12, 'm': 4, 'upscale': 4})
    torch.save({'params': largest.state_dict()}, tmp_path / 'fsrcnn56.pth')
    network = REPO / 'options' / 'networks' / 'CDNSR_FSRCNN_x4.yml'
    result = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'prune_branches.py'), '--network',
        str(network), '--checkpoint',
        str(tmp_path / 'fsrcnn56.pth'), '--out',
        str(tmp_path / 'parts')
    ],
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'pretrain_network_branch0:' in result.stdout
    net = build_network(yaml.safe_load(network.read_text())['network_g'])
    load_parts(net.named_parts(),
               {f'pretrain_network_branch{i}': tmp_path / 'parts' / f'branch{i}.pth'
                for i in range(3)})
    assert all(torch.equal(a, b) for a, b in zip(net.branches[2].state_dict().values(), largest.state_dict().values()))
    small = prune({'type': 'FSRCNN', 'd': 56, 's': 12, 'm': 4, 'upscale': 4}, largest, 16)[1]
    assert all(torch.equal(a, b) for a, b in zip(net.branches[0].state_dict().values(), small.state_dict().values()))


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (children inherit it)."""
    found = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / 'environ').read_bytes():
                    status = (entry / 'status').read_text()
                    if '\nState:\tZ' not in status:  # a zombie has ended
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def _start_prepare(tmp_path: Path, photos, marker: str) -> subprocess.Popen:
    """tools/prepare_data.py with 2 workers on enough large photos to still be running a few seconds in."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    for index in range(24):
        photo = cv2.resize(photos[index % len(photos)], (1200, 900), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f'p{index:02d}.png'), photo)
    env = {**os.environ, 'CDNSR_TEST_MARKER': marker, 'CUDA_VISIBLE_DEVICES': ''}
    return subprocess.Popen([
        sys.executable,
        str(REPO / 'tools' / 'prepare_data.py'), '--input',
        str(folder), '--output',
        str(tmp_path / 'set'), '--reference', 'bicubic', '--workers', '2', '--stride', '8', '--multiscale',
        '1,0.9,0.8,0.7'
    ],
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.skipif(not Path('/proc/self/environ').exists(), reason='needs /proc (Linux)')
def test_prepare_data_killed_leaves_no_process_behind(tmp_path, photos):
    """SIGKILL of tools/prepare_data.py once left its fork server, resource tracker and a worker running
    (0.8 GB) for good; the workers now watch the parent and everything ends within seconds."""
    import uuid
    marker = f'cdnsr-kill-{uuid.uuid4()}'
    run = _start_prepare(tmp_path, photos, marker)
    deadline = time.time() + 60
    while len(_processes_with(marker)) < 4 and time.time() < deadline:  # main, tracker, fork server, a worker
        time.sleep(0.2)
    time.sleep(1.0)
    assert run.poll() is None, 'the run ended before it could be killed: give it more work'
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.time() + 15
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == []
    assert not (tmp_path / 'set').exists()  # nothing that looks complete


def _live_in_group(group: int) -> list[int]:
    """Pids of the processes of process group ``group`` that have not ended (zombies have)."""
    found = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] != 'Z':
                found.append(int(entry.name))
    return found


def _file_hashes(folder: Path) -> dict:
    import hashlib
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def _ctrl_c_run(tool: str, input_dir: Path, out: Path, err: Path) -> subprocess.Popen:
    """The tool in a process group of its own, as a shell runs it in the foreground (Ctrl-C: SIGINT to the group:
    the tool, its fork server, resource tracker and workers)."""
    extra = ['--reference', 'bicubic'] if tool == 'prepare_data' else ['--tiers', '2K=300,8K=0']
    command = [sys.executable, str(REPO / 'tools' / f'{tool}.py'), '--input', str(input_dir), '--output', str(out)]
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'PYTHONPATH': str(REPO)}
    with open(err, 'w') as handle:
        return subprocess.Popen([*command, '--workers', '2', *extra],
                                stdout=subprocess.DEVNULL,
                                stderr=handle,
                                start_new_session=True,
                                env=env)


def _assert_one_line_and_nothing_complete(run: subprocess.Popen, tool: str, out: Path, err: Path, moment: str):
    import re
    assert run.wait(timeout=120) == 130, (moment, err.read_text()[-3000:])
    deadline = time.time() + 120  # the fork server may still be importing torch: whatever it prints counts too
    while _live_in_group(run.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _live_in_group(run.pid) == [], moment
    text = err.read_text()
    lines = [line for line in re.split(r'[\r\n]+', text) if line.strip() and '%|' not in line]  # not tqdm's bars
    assert len(lines) == 1 and lines[0].startswith(f'{tool}: interrupted; '), (moment, text[-3000:])
    assert not out.exists() and not out.with_name(out.name + '.lock').exists(), moment
    staging = out.with_name(out.name + '.incomplete')  # if any: marked as the tool's, never looking complete
    marked = (staging / '.cdnsr_plugin_staging').is_file() and not (staging / 'summary.json').exists()
    assert not staging.exists() or marked, moment


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='needs /proc (Linux)')
def test_ctrl_c_at_any_moment_ends_with_one_line_and_exit_130(tmp_path, photos, capsys):
    """Ctrl-C in a terminal (SIGINT to the process group) while torch is imported (0.5, 2, 4 s: once a traceback,
    or lost: exit 0 with a complete output) and while the workers start (once worker tracebacks after the message):
    one line, exit 130, no output, inputs unchanged, nothing printed later by the fork server or a worker. While
    the last run is going, a second run on its --output fails at once naming it."""
    import importlib.util
    folder = tmp_path / 'photos'
    folder.mkdir()
    for index in range(6):
        cv2.imwrite(str(folder / f'p{index}.png'), cv2.resize(photos[index % len(photos)], (900, 700)))
    inputs = _file_hashes(folder)
    moments = [('prepare_data', 0.5), ('prepare_data', 2.0), ('prepare_data', 4.0), ('make_test_sets', 2.0)]
    runs, started = [], time.monotonic()
    for index, (tool, _) in enumerate(moments):
        runs.append(_ctrl_c_run(tool, folder, tmp_path / f'out{index}', tmp_path / f'err{index}.txt'))
    for index, (tool, delay) in enumerate(moments):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        os.killpg(runs[index].pid, signal.SIGINT)
    for index, (tool, delay) in enumerate(moments):
        _assert_one_line_and_nothing_complete(runs[index], tool, tmp_path / f'out{index}', tmp_path / f'err{index}.txt',
                                              f'{tool} at {delay} s')
    out = tmp_path / 'set'
    run = _ctrl_c_run('prepare_data', folder, out, tmp_path / 'err.txt')
    deadline = time.time() + 180
    while not (out.with_name('set.incomplete') / '.cdnsr_plugin_staging').exists() and time.time() < deadline:
        assert run.poll() is None, (tmp_path / 'err.txt').read_text()[-3000:]
        time.sleep(0.05)
    spec = importlib.util.spec_from_file_location('prepare_data', REPO / 'tools' / 'prepare_data.py')
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)
    began = time.monotonic()
    code = second.main(['--input', str(folder), '--output', str(out), '--reference', 'bicubic', '--workers', '0'])
    assert code == 2 and time.monotonic() - began < 10
    message = capsys.readouterr().err
    first = f'process {run.pid} ({REPO / "tools" / "prepare_data.py"} --input'  # its pid and command
    assert f'another run is writing the output {out}: {first}' in message
    assert run.poll() is None, 'the first run ended before its Ctrl-C: give it more work'
    os.killpg(run.pid, signal.SIGINT)  # the workers are starting (the fork server imports torch)
    _assert_one_line_and_nothing_complete(run, 'prepare_data', out, tmp_path / 'err.txt', 'while workers start')
    assert _file_hashes(folder) == inputs
