"""BasicSR's stock train.py (run from a checkout-like tree) and the plugin's entries train and test
plugin archs on a tiny set of real-photo crops, on CPU."""
import re
import shutil
from pathlib import Path

import basicsr
import pytest
import torch

from cdnsr_plugin.archs.fsrcnn_arch import FSRCNN

from helpers import read_log, run

pytestmark = pytest.mark.slow

OPTIONS = """
name: {name}
model_type: SRModel
scale: 4
num_gpu: 0
manual_seed: 0
datasets:
  train:
    name: tiny
    type: PairedImageDataset
    dataroot_gt: {root}/gt
    dataroot_lq: {root}/lq
    io_backend: {{type: disk}}
    gt_size: 32
    use_hflip: true
    use_rot: true
    num_worker_per_gpu: 0
    batch_size_per_gpu: 4
    dataset_enlarge_ratio: 1
    prefetch_mode: ~
  val:
    name: tiny_val
    type: PairedImageDataset
    dataroot_gt: {root}/gt
    dataroot_lq: {root}/lq
    io_backend: {{type: disk}}
network_g: {network}
path: {{pretrain_network_g: ~, strict_load_g: true, resume_state: ~}}
train:
  ema_decay: 0
  optim_g: {{type: Adam, lr: !!float 1e-3, betas: [0.9, 0.999]}}
  scheduler: {{type: CosineAnnealingRestartLR, periods: [6], restart_weights: [1], eta_min: !!float 1e-7}}
  total_iter: 6
  warmup_iter: -1
  pixel_opt: {{type: L1Loss, loss_weight: 1.0, reduction: mean}}
val:
  val_freq: 6
  save_img: false
  metrics:
    psnr: {{type: calculate_psnr, crop_border: 4, test_y_channel: true}}
logger: {{print_freq: 2, save_checkpoint_freq: 6, use_tb_logger: false}}
dist_params: {{backend: nccl, port: 29500}}
"""


def write_options(path: Path, name: str, root: Path, network: str) -> Path:
    path.write_text(OPTIONS.format(name=name, root=root, network=network))
    return path


def test_stock_basicsr_train_script_finds_plugin_arch(tmp_path, paired_folder):
    """``python basicsr/train.py -opt ...`` from a BasicSR-checkout-like folder, basicsr unedited."""
    (tmp_path / 'basicsr').mkdir()
    shutil.copy(Path(basicsr.__file__).parent / 'train.py', tmp_path / 'basicsr' / 'train.py')
    opt = write_options(tmp_path / 'opt.yml', 'stock_fsrcnn', paired_folder, '{type: FSRCNN, d: 16, upscale: 4}')
    run(['basicsr/train.py', '-opt', str(opt)], cwd=tmp_path)
    experiment = tmp_path / 'experiments' / 'stock_fsrcnn'
    log = read_log(experiment)
    assert 'Network [FSRCNN] is created.' in log
    assert re.search(r'iter:\s*6,', log), 'the log shows iteration 6'
    saved = torch.load(experiment / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    fresh = FSRCNN(d=16, upscale=4).state_dict()
    assert saved.keys() == fresh.keys()
    assert not torch.equal(saved['head_conv.0.weight'], fresh['head_conv.0.weight'])
    assert re.search(r'Validation tiny_val\s+# psnr: \d+\.\d+', log)


def test_plugin_entries_train_then_test_under_cwd(tmp_path, paired_folder):
    train_opt = write_options(tmp_path / 'train.yml', 'entry_carn', paired_folder,
                              '{type: CARN, num_feat: 16, upscale: 4}')
    run(['-m', 'cdnsr_plugin.train', '-opt', str(train_opt)], cwd=tmp_path)
    model = tmp_path / 'experiments' / 'entry_carn' / 'models' / 'net_g_latest.pth'
    assert model.is_file()
    test_opt = tmp_path / 'test.yml'
    test_opt.write_text(f"""
name: entry_carn_test
model_type: SRModel
scale: 4
num_gpu: 0
datasets:
  test_1: {{name: tiny_test, type: PairedImageDataset, dataroot_gt: {paired_folder}/gt,
           dataroot_lq: {paired_folder}/lq, io_backend: {{type: disk}}}}
network_g: {{type: CARN, num_feat: 16, upscale: 4}}
path: {{pretrain_network_g: {model}, strict_load_g: true, param_key_g: params}}
val:
  save_img: true
  suffix: ~
  metrics:
    psnr: {{type: calculate_psnr, crop_border: 4, test_y_channel: true}}
""")
    run(['-m', 'cdnsr_plugin.test', '-opt', str(test_opt)], cwd=tmp_path)
    results = tmp_path / 'results' / 'entry_carn_test'
    images = sorted((results / 'visualization' / 'tiny_test').glob('*.png'))
    assert len(images) == len(list((paired_folder / 'gt').glob('*.png')))
    log = read_log(results)
    assert 'Loading CARN model from' in log and re.search(r'Validation tiny_test\s+# psnr: \d+\.\d+', log)
