"""Training never loses a run's results and stops on a bad option file or state with one line and exit 2
(issue 25): the experiment lock, resuming past the schedule, a state of another experiment or network, a pickle
that would run code, and option files that are not plain YAML, through every entry that reads one."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdnsr_plugin.utils.options import write_options

from helpers import REPO, demo_options, run

pytestmark = pytest.mark.slow
DEMO = 'train_FSRCNN_demo.yml'  # one FSRCNN: the quickest real training


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob('*')) if path.is_file()
    }


def options(training_data, name: str, iters: int, **path) -> dict:
    """The demo FSRCNN for ``2 * iters`` iterations, a checkpoint every two."""
    opt = demo_options(DEMO, name, *training_data, stage_iters=iters, checkpoint_every=2)
    opt['path'].update(path)
    return opt


@pytest.fixture(scope='module')
def trained(tmp_path_factory, training_data) -> Path:
    """``experiments/done`` trained to iteration 6 (states at 2, 4 and 6)."""
    root = tmp_path_factory.mktemp('trained')
    opt_file = write_options(root / 'done.yml', options(training_data, 'done', 3))
    run(['-m', 'cdnsr_plugin.train', '-opt', str(opt_file)], cwd=root)
    assert (root / 'experiments' / 'done' / 'training_states' / '6.state').is_file()
    return root


def refused(root: Path, opt: dict, *extra: str) -> str:
    """Run the plugin's entry on ``opt`` in ``root``; assert exit 2, no traceback; return stderr."""
    opt_file = write_options(root / f"{opt['name']}_{len(list(root.glob('*.yml')))}.yml", opt)
    result = run(['-m', 'cdnsr_plugin.train', '-opt', str(opt_file), *extra], cwd=root, check=False)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_resuming_past_the_schedule_is_refused_and_the_final_model_kept(trained, training_data):
    experiment = trained / 'experiments' / 'done'
    before = tree_hashes(experiment)
    state = experiment / 'training_states' / '6.state'
    message = refused(trained, options(training_data, 'done', 2, resume_state=str(state)))
    assert f'{state} is at iteration 6, past train.total_iter 4' in message
    assert 'net_g_latest.pth would be overwritten' in message
    message = refused(trained, options(training_data, 'done', 2), '--auto_resume')
    assert 'is at iteration 6, past train.total_iter 4' in message
    assert tree_hashes(experiment) == before
    assert sorted(p.name for p in (trained / 'experiments').iterdir()) == ['done']  # nothing archived or locked


def test_a_state_of_another_experiment_or_network_is_refused_naming_it(trained, training_data):
    experiment = trained / 'experiments' / 'done'
    before = tree_hashes(experiment)
    state = str(experiment / 'training_states' / '4.state')
    message = refused(trained, options(training_data, 'renamed', 3, resume_state=state))
    assert "belongs to the experiment 'done', not to name: 'renamed'" in message
    assert not (trained / 'experiments' / 'renamed').exists()
    wider = options(training_data, 'done', 3, resume_state=state)
    wider['network_g']['d'] = wider['network_g'].get('d', 56) + 8  # another width of FSRCNN's feature layer
    message = refused(trained, wider)
    assert 'net_g_4.pth does not fit' in message and 'wrong shapes [' in message
    assert 'body' in message or 'weight' in message  # the mismatched keys are named
    assert tree_hashes(experiment) == before


class _Payload:

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker, ))


def test_a_pickle_that_would_run_code_as_resume_state_is_refused(trained, training_data, tmp_path):
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'training_states' / '4.state'
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({'iter': 4, 'x': _Payload(marker)}))
    message = refused(trained, options(training_data, 'done', 3, resume_state=str(evil)))
    assert f'path.resume_state: training state {evil} ' in message  # one entry naming the file
    assert 'is refused: loading it would call' in message or 'cannot be read (UnpicklingError' in message
    assert 'weights_only' not in message  # never torch's advice to load it unsafely
    assert not marker.exists()


BAD_YAML = {
    'python tag': '!!python/object/apply:pathlib.Path.touch ["{marker}"]\n',
    'syntax error': 'name: x\nnetwork_g: {type: FSRCNN\n',
    'duplicate key': 'name: x\nname: y\n',
    'alias bomb': 'a: &a [x, x, x, x, x, x, x, x, x, x]\n' +
    ''.join(f'{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, '
            f'*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n'
            for i in range(7)),
}
ENTRIES = {
    'cdnsr_plugin.train': lambda f: ['-m', 'cdnsr_plugin.train', '-opt', f],
    'basicsr/train.py': lambda f: ['basicsr/train.py', '-opt', f],
    'cdnsr_plugin.test': lambda f: ['-m', 'cdnsr_plugin.test', '-opt', f],
    'tools/test_patches.py': lambda f: [str(REPO / 'tools' / 'test_patches.py'), '-opt', f],
    'tools/count_flops.py': lambda f: [str(REPO / 'tools' / 'count_flops.py'), '-opt', f],
}
PROBLEMS = {
    'python tag': 'a !!python/... tag asks YAML to build a Python object',
    'syntax error': "expected ',' or '}'",
    'duplicate key': "duplicate key 'name'",
    'alias bomb': 'an alias bomb, not an option file',
}


@pytest.mark.parametrize('entry, kind', [(entry, 'python tag') for entry in ENTRIES] +
                         [('cdnsr_plugin.train', kind)
                          for kind in BAD_YAML if kind != 'python tag'] + [('tools/test_patches.py', 'alias bomb')])
def test_an_option_file_that_is_not_plain_yaml_is_one_line_and_exit_2(entry, kind, tmp_path):
    marker = tmp_path / 'code_ran'
    bad = tmp_path / 'bad.yml'
    bad.write_text(BAD_YAML[kind].replace('{marker}', str(marker)))
    if entry == 'basicsr/train.py':
        import basicsr
        (tmp_path / 'basicsr').mkdir()
        (tmp_path / 'basicsr' / 'train.py').write_bytes((Path(basicsr.__file__).parent / 'train.py').read_bytes())
    result = run(ENTRIES[entry](str(bad)), cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if 'bad.yml' in line]
    assert len(lines) == 1 and PROBLEMS[kind] in lines[0], result.stderr[-2000:]
    assert not marker.exists()
    assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'results').exists()


def _lock_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_a_second_run_of_one_experiment_fails_at_once_and_a_dead_runs_lock_is_taken_over(tmp_path, training_data):
    long_run = options(training_data, 'shared', 2000)
    first = subprocess.Popen(
        [sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
         str(write_options(tmp_path / 'first.yml', long_run))],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'})
    lock = tmp_path / 'experiments' / 'shared.lock'
    try:
        deadline = time.time() + 120
        while _lock_info(lock).get('pid') != first.pid or not (tmp_path / 'experiments' / 'shared' / 'models').exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:] if first.poll() else ''
            time.sleep(0.2)
        folder_before = sorted(p.name for p in (tmp_path / 'experiments').iterdir())
        message = refused(tmp_path, options(training_data, 'shared', 2))
        assert f'another run is writing the experiment {tmp_path / "experiments" / "shared"}: process {first.pid}' \
            in message and 'first.yml' in message
        assert sorted(p.name for p in (tmp_path / 'experiments').iterdir()) == folder_before  # nothing archived
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _lock_info(lock).get('pid') == first.pid  # a SIGKILL leaves the file; the OS dropped the lock
    third = run([
        '-m', 'cdnsr_plugin.train', '-opt',
        str(write_options(tmp_path / 'third.yml', options(training_data, 'shared', 1)))
    ],
                cwd=tmp_path)
    assert 'taking over the lock on the experiment' in third.stdout and f'process {first.pid}' in third.stdout
    assert not lock.exists()  # removed when the third run ended
    assert (tmp_path / 'experiments' / 'shared' / 'models' / 'net_g_latest.pth').is_file()


def test_ctrl_c_in_training_is_one_line_and_exit_130_and_the_run_resumes(tmp_path, training_data):
    opt_file = write_options(tmp_path / 'long.yml', options(training_data, 'stopped', 2000))
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    process = subprocess.Popen([sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
                                str(opt_file)],
                               cwd=tmp_path,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE,
                               text=True,
                               env=env)
    states = tmp_path / 'experiments' / 'stopped' / 'training_states'
    deadline = time.time() + 180
    while not (states.is_dir() and any(states.glob('*.state'))):  # training, with a state saved
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert 'Traceback' not in err and 'interrupted; the checkpoints and training states saved so far are kept' in err
    assert not (tmp_path / 'experiments' / 'stopped.lock').exists()  # released at exit
