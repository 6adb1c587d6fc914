"""Real training runs through both entries (the plugin's and BasicSR's stock train.py), kill and resume,
2-process CPU DDP, the BasicSR test pipeline, and validation against the tester."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.models.stages import parse_stages, stage_at
from cdnsr_plugin.utils.options import load_options, write_options

from helpers import REPO, demo_options, read_log, run

pytestmark = pytest.mark.slow
DEMOS = [
    'train_CDNSR_FSRCNN_demo.yml', 'train_CDNSR_EDSR_demo.yml', 'train_ClassSR_FSRCNN_demo.yml', 'train_FSRCNN_demo.yml'
]


@pytest.mark.parametrize('entry', ['plugin', 'stock'])
@pytest.mark.parametrize('demo', DEMOS)
def test_demo_option_files_train_every_stage(tmp_path, training_data, demo, entry):
    import basicsr
    opt = demo_options(demo, 'demo_run', *training_data)
    options = write_options(tmp_path / demo, opt)
    if entry == 'stock':
        (tmp_path / 'basicsr').mkdir()
        (tmp_path / 'basicsr' / 'train.py').write_text((Path(basicsr.__file__).parent / 'train.py').read_text())
        run(['basicsr/train.py', '-opt', str(options)], cwd=tmp_path)
    else:
        run(['-m', 'cdnsr_plugin.train', '-opt', str(options)], cwd=tmp_path)
    experiment = tmp_path / 'experiments' / 'demo_run'
    log = read_log(experiment)
    stages = opt['train'].get('stages', [])
    for i, stage in enumerate(stages):
        assert f'Stage {i + 1}/{len(stages)} "{stage["name"]}"' in log
    assert 'Validation demo_val' in log and '# psnr' in log and '# ssim' in log
    if stages:
        assert 'Routing on demo_val: patches per class' in log
    net = build_network(opt['network_g'])
    saved = torch.load(experiment / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    net.load_state_dict(saved)  # the checkpoint reloads into the option file's network


def test_killed_run_resumes_in_the_right_stage(tmp_path, training_data):
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'resume_run', *training_data, stage_iters=40, checkpoint_every=5)
    opt['datasets']['train']['batch_size_per_gpu'] = 4
    options = write_options(tmp_path / 'resume.yml', opt)
    states = tmp_path / 'experiments' / 'resume_run' / 'training_states'
    process = subprocess.Popen([sys.executable, '-m', 'cdnsr_plugin.train', '-opt',
                                str(options)],
                               cwd=tmp_path,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(states.glob('*.state')):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(p.stem) for p in states.glob('*.state'))
    assert process.returncode == -signal.SIGKILL and saved, 'the run was not killed mid-way'
    resume_from = saved[-1]
    run(['-m', 'cdnsr_plugin.train', '-opt', str(options), '--auto_resume'], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'resume_run')
    assert f'Resuming training from epoch: 0, iter: {resume_from}.' in log or \
        f'iter: {resume_from}.' in log.split('Resuming training from')[1].splitlines()[0]
    stage = stage_at(parse_stages(opt['train'], set(opt['train']['losses']))[0], resume_from + 1)
    after_resume = log.split('Resuming training from')[1]
    stages = len(opt['train']['stages'])
    assert f'Stage {stage.index + 1}/{stages} "{stage.name}" from iter {stage.start}' in after_resume
    assert (tmp_path / 'experiments' / 'resume_run' / 'models' / 'net_g_latest.pth').is_file()


def test_rcan_option_file_starts_training_through_stock_basicsr_train(tmp_path, training_data):
    """``python basicsr/train.py -opt options/train_CDNSR_RCAN.yml`` from a BasicSR-like tree: the
    paper-scale file as shipped, cut to one iteration per stage, batch 2 and our small data set."""
    import basicsr
    opt = load_options(REPO / 'options' / 'train_CDNSR_RCAN.yml')
    train_set, _ = training_data
    opt['datasets'] = {
        'train': dict(
            opt['datasets']['train'],
            dataroot_gt=str(train_set / 'gt.lmdb'),
            dataroot_lq=str(train_set / 'lq.lmdb'),
            batch_size_per_gpu=2,
            num_worker_per_gpu=0)
    }
    opt.pop('val')
    for stage in opt['train']['stages']:
        stage['iters'] = 1
    opt['train']['total_iter'] = 4
    opt['train']['losses']['contrast']['random_weights'] = True  # no VGG-19 file in CI (explicit test flag)
    opt['logger'].update(print_freq=1, use_tb_logger=False)
    options = write_options(tmp_path / 'rcan.yml', opt)
    (tmp_path / 'basicsr').mkdir()
    (tmp_path / 'basicsr' / 'train.py').write_text((Path(basicsr.__file__).parent / 'train.py').read_text())
    run(['basicsr/train.py', '-opt', str(options)], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / opt['name'])
    assert 'Network [RCAN] is created.' in log and 'Stage 4/4 "finetune"' in log
    assert 'l_contrast' in log and 'iter:       4' in log


def test_two_process_cpu_ddp_keeps_ranks_identical(tmp_path, training_data):
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'ddp_run', *training_data, stage_iters=2, checkpoint_every=4)
    options = write_options(tmp_path / 'ddp.yml', opt)
    result = run([
        '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'cdnsr_plugin.train', '-opt',
        str(options), '--launcher', 'pytorch'
    ],
                 cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'ddp_run')
    assert 'World size (gpu number): 2' in log
    checks = [line for line in log.splitlines() if 'DDP check: weights identical on 2 ranks' in line]
    assert len(checks) >= 2, result.stdout[-2000:]  # at iteration 4 and 8
    stages = len(opt['train']['stages'])
    assert f'Stage {stages}/{stages} "finetune"' in log and 'Routing on demo_val' in log


@pytest.fixture(scope='module')
def trained_demo(tmp_path_factory, training_data) -> tuple[Path, dict, Path]:
    """The CDNSR demo file trained 2 iterations per stage through ``python -m cdnsr_plugin.train``: the
    run folder, its options and the latest checkpoint."""
    root = tmp_path_factory.mktemp('trained_demo')
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'for_test', *training_data, stage_iters=2)
    run(['-m', 'cdnsr_plugin.train', '-opt', str(write_options(root / 'train.yml', opt))], cwd=root)
    return root, opt, root / 'experiments' / 'for_test' / 'models' / 'net_g_latest.pth'


def test_trained_checkpoint_runs_through_basicsr_test_pipeline_with_routing(tmp_path, training_data, trained_demo):
    """``python -m cdnsr_plugin.test`` with model_type CDNSRModel: routed, full-coverage SR images."""
    _, val_set = training_data
    _, opt, checkpoint = trained_demo
    test_opt = {
        'name': 'routed_test',
        'model_type': 'CDNSRModel',
        'scale': 4,
        'num_gpu': 0,
        'datasets': {'test_1': dict(opt['datasets']['val'], name='held_out')},
        'network_g': opt['network_g'],
        'path': {'pretrain_network_g': str(checkpoint), 'strict_load_g': True, 'param_key_g': 'params'},
        'val': {
            'save_img': True, 'suffix': None, 'patch': 32, 'stride': 28,
            'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}
        },
    }
    run(['-m', 'cdnsr_plugin.test', '-opt', str(write_options(tmp_path / 'test.yml', test_opt))], cwd=tmp_path)
    results = tmp_path / 'results' / 'routed_test'
    log = read_log(results)
    assert 'Routing on held_out: patches per class' in log and '# psnr' in log
    import cv2
    for hr in sorted((val_set / 'HR').glob('*.png')):
        sr = cv2.imread(str(results / 'visualization' / 'held_out' / f'{hr.stem}_routed_test.png'))
        assert sr is not None and sr.shape == cv2.imread(str(hr)).shape  # every pixel, exactly x4


def test_validation_psnr_equals_the_testers_psnr(tmp_path, training_data, trained_demo):
    """One executor: BasicSR's validation of CDNSRModel (what training logs) and tools/test_patches.py give the
    same PSNR for a trained demo checkpoint on the same images (the demo's Y PSNR, crop 4)."""
    from basicsr.data import build_dataloader, build_dataset
    from basicsr.models import build_model

    from cdnsr_plugin.tester.cli import main as test_patches
    _, val_set = training_data
    root, opt, checkpoint = trained_demo
    model_opt = dict(
        opt,
        is_train=False,
        dist=False,
        rank=0,
        world_size=1,
        num_gpu=0,
        path={
            'pretrain_network_g': str(checkpoint), 'strict_load_g': True, 'param_key_g': 'params',
            'visualization': str(tmp_path / 'vis'), 'results_root': str(tmp_path)
        })
    model = build_model(model_opt)
    dataset = build_dataset(dict(opt['datasets']['val'], phase='val', scale=4))
    loader = build_dataloader(dataset, dict(opt['datasets']['val'], phase='val'), num_gpu=0, dist=False)
    model.validation(loader, current_iter=0, tb_logger=None, save_img=False)
    validated = model.metric_results['psnr']
    code = test_patches([
        '--input',
        str(val_set / 'LR_bicubic' / 'X4'), '--gt',
        str(val_set / 'HR'), '--checkpoint',
        str(checkpoint), '--scale', '4', '--out',
        str(tmp_path / 'tester'), '--no-save-images'
    ])
    assert code == 0
    report = json.loads((tmp_path / 'tester' / 'report.json').read_text())
    tested = report['settings'][0]['sets'][0]
    assert report['settings'][0]['name'] == 'argmax' and tested['images'] == len(dataset) == 2
    assert validated == pytest.approx(tested['psnr_y'], abs=1e-9)
