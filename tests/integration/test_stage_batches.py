"""Every stage runs its iterations at its own batch size, through both entries, after a resume and under DDP
(``utils/batches.py``, ``compat.full_epochs``)."""
import re
import shutil
from pathlib import Path

import pytest

from cdnsr_plugin.data.prepared_set import PreparedSet
from cdnsr_plugin.utils.options import write_options

from helpers import demo_options, read_log, run

pytestmark = pytest.mark.slow
# ClassSR's demo file: pretrain (labels), classifier (soft, Average-Loss), finetune; iterations and batch per stage
SCHEDULE = ((6, 9), (10, 12), (4, 5))


def classsr_options(training_data, name: str, checkpoint_every: int = 1000) -> dict:
    opt = demo_options('train_ClassSR_FSRCNN_demo.yml', name, *training_data, checkpoint_every=checkpoint_every)
    for stage, (iters, batch) in zip(opt['train']['stages'], SCHEDULE):
        stage.update(iters=iters, batch_size_per_gpu=batch)
    opt['train']['total_iter'] = sum(iters for iters, _ in SCHEDULE)
    return opt


def iterations_by_stage(log: str) -> dict[int, list[int]]:
    """The iterations BasicSR's message logger printed (print_freq 1), by the stage the model logged with them."""
    found: dict[int, list[int]] = {}
    for line in log.splitlines():
        match = re.search(r'iter:\s*(\d+),.*\bstage: ([0-9.e+]+)', line)
        if match:
            found.setdefault(int(float(match.group(2))), []).append(int(match.group(1)))
    return found


def stock_train_py(folder: Path) -> Path:
    import basicsr
    (folder / 'basicsr').mkdir()
    shutil.copy(Path(basicsr.__file__).parent / 'train.py', folder / 'basicsr' / 'train.py')
    return folder / 'basicsr' / 'train.py'


def test_the_training_set_is_not_a_multiple_of_any_batch(training_data):
    samples = len(PreparedSet(training_data[0]).labels)
    assert all(samples % batch for _, batch in SCHEDULE), samples  # else the cut the fix prevents would not show


def test_the_last_stage_is_not_cut_short(tmp_path, training_data):
    """BasicSR counts ceil(56 / 9) = 7 iterations per epoch and runs 11 epochs for 70 iterations; its loader, dropping
    the last partial batch, gives 6: without the fix the run stops at 66, four iterations into the last stage."""
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'not_cut', *training_data, stage_iters=14)
    opt['datasets']['train']['batch_size_per_gpu'] = 9
    run(['-m', 'cdnsr_plugin.train', '-opt', str(write_options(tmp_path / 'train.yml', opt))], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'not_cut')
    assert iterations_by_stage(log)[5] == list(range(57, 71)) and 'batch 9' in log


@pytest.mark.parametrize('entry', ['plugin', 'stock'])
def test_every_stage_runs_its_iterations_at_its_batch_size(tmp_path, training_data, entry):
    opt = classsr_options(training_data, 'stage_batches')
    options = write_options(tmp_path / 'train.yml', opt)
    script = ['-m', 'cdnsr_plugin.train'] if entry == 'plugin' else [str(stock_train_py(tmp_path))]
    run([*script, '-opt', str(options)], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'stage_batches')
    first = 1
    for index, (iters, batch) in enumerate(SCHEDULE, start=1):
        assert iterations_by_stage(log)[index] == list(range(first, first + iters))
        assert re.search(rf'Stage {index}/3 "\w+" from iter {first} to {first + iters - 1}: .*, batch {batch}\n', log)
        first += iters


def test_a_run_resumed_mid_stage_keeps_each_stages_batch(tmp_path, training_data):
    """Resumed at iteration 12 (stage 2, in the middle of BasicSR's second epoch), the loop restarts that epoch: the
    batches must follow the iterations (12 per batch until 16, then 5), which the model checks every iteration."""
    opt = classsr_options(training_data, 'resumed', checkpoint_every=3)
    options = write_options(tmp_path / 'train.yml', opt)
    run(['-m', 'cdnsr_plugin.train', '-opt', str(options)], cwd=tmp_path)
    experiment = tmp_path / 'experiments' / 'resumed'
    for later in (15, 18):
        (experiment / 'training_states' / f'{later}.state').unlink()
    for log_file in experiment.glob('*.log'):
        log_file.unlink()
    run(['-m', 'cdnsr_plugin.train', '-opt', str(options), '--auto_resume'], cwd=tmp_path)
    log = read_log(experiment)
    assert 'Resuming training from epoch: 1, iter: 12.' in log
    assert iterations_by_stage(log) == {2: [13, 14, 15, 16], 3: [17, 18, 19, 20]}
    assert re.search(r'Stage 2/3 "classifier" .*, batch 12\n', log) and re.search(r'Stage 3/3 .*, batch 5\n', log)


def test_two_process_ddp_takes_the_stage_batch_on_every_rank(tmp_path, training_data):
    opt = classsr_options(training_data, 'ddp_batches')
    options = write_options(tmp_path / 'train.yml', opt)
    run([
        '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'cdnsr_plugin.train', '-opt',
        str(options), '--launcher', 'pytorch'
    ],
        cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'ddp_batches')
    # the Average-Loss of the classifier stage balances the global batch of 2 x 12
    assert 'Stage 2/3 "classifier" from iter 7 to 16' in log and 'batch 12 per process, 24 in all' in log
    assert 'batch 5 per process, 10 in all' in log
    assert iterations_by_stage(log)[3] == [17, 18, 19, 20]
