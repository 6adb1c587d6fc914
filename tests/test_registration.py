"""Registration into basicsr, the start-up hook, the compat layer."""
import re
from pathlib import Path

import pytest
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

import cdnsr_plugin
from cdnsr_plugin.registry import register

REPO_OPTIONS = Path(__file__).resolve().parents[1] / 'options'

PLUGIN_ARCHS = {'FSRCNN', 'CARN', 'PatchClassifier', 'GainRouter', 'CDNSRNet'}


def test_import_registers_every_arch_as_the_plugin_class():
    names = cdnsr_plugin.registered_names()
    assert set(names['arch']) == PLUGIN_ARCHS
    for name in PLUGIN_ARCHS:
        assert ARCH_REGISTRY.get(name).__module__.startswith('cdnsr_plugin.')


def test_name_clash_names_the_owner():

    class FSRCNN:  # a second package's FSRCNN
        pass

    with pytest.raises(RuntimeError, match=r'cdnsr_plugin\.archs\.fsrcnn_arch\.FSRCNN already owns'):
        register(ARCH_REGISTRY)(FSRCNN)


def test_torchvision_alias_lets_basicsr_degradations_import():
    import torchvision.transforms.functional as functional
    import torchvision.transforms.functional_tensor as legacy
    from basicsr.data import degradations  # noqa: F401  (imports functional_tensor at module level)
    assert legacy.rgb_to_grayscale is functional.rgb_to_grayscale


def test_basicsr_option_parsing_uses_a_safe_loader(tmp_path):
    """What the entries that run basicsr's pipelines apply (``patch_basicsr``; importing the plugin does not,
    see integration/test_startup_hook.py)."""
    from cdnsr_plugin.compat import patch_basicsr
    patch_basicsr()
    from basicsr.utils.options import ordered_yaml
    marker = tmp_path / 'pwned'
    evil = f'name: x\nhack: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(yaml.YAMLError):
        yaml.load(evil, Loader=ordered_yaml()[0])
    assert not marker.exists()
    opt = yaml.load('b: 1\na: !!float 2e-4\nc: {d: 1}\n', Loader=ordered_yaml()[0])
    assert list(opt) == ['b', 'a', 'c'] and opt['a'] == 2e-4 and type(opt).__name__ == 'OrderedDict'


def test_duplicate_option_keys_are_refused_naming_the_key_and_line(tmp_path):
    """PyYAML lets the last of two equal keys win silently; an option file that sets ``lr`` twice is a
    mistake that changes a run. Both loaders (basicsr's patched one and ``load_yaml``) refuse it."""
    from cdnsr_plugin.compat import OptionFileError, load_yaml, patch_basicsr
    patch_basicsr()
    from basicsr.utils.options import ordered_yaml
    text = 'name: x\ntrain:\n  lr: 1.0e-3\n  total_iter: 10\n  lr: 2.0e-4\n'
    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'lr'[\s\S]*line 5"):
        yaml.load(text, Loader=ordered_yaml()[0])
    path = tmp_path / 'dup.yml'
    path.write_text(text)
    with pytest.raises(OptionFileError, match=r"dup.yml: not a usable option file: duplicate key 'lr'.*line 5"):
        load_yaml(str(path))  # one line naming the file, the key and the line
    assert load_yaml(str(REPO_OPTIONS / 'networks' / 'CDNSR_FSRCNN_x4.yml'))['network_g']['type'] == 'CDNSRNet'


def test_auto_resume_skips_a_truncated_state_for_the_previous_one(tmp_path, monkeypatch, capsys):
    """A kill during BasicSR's ``torch.save`` of ``200.state`` leaves a truncated file: resuming warns naming
    it and resumes from ``100.state`` (whose network checkpoint ``check_resume`` then points at); when no
    state loads, the error names every file."""
    import torch

    from cdnsr_plugin.compat import load_resume_state
    monkeypatch.chdir(tmp_path)
    states = tmp_path / 'experiments' / 'run' / 'training_states'
    states.mkdir(parents=True)
    torch.save({'iter': 100, 'epoch': 0, 'optimizers': [], 'schedulers': []}, states / '100.state')
    torch.save({'iter': 200, 'epoch': 0, 'optimizers': [], 'schedulers': []}, states / '200.state')
    whole = (states / '200.state').read_bytes()
    (states / '200.state').write_bytes(whole[:len(whole) // 2])

    def opt():
        return {
            'name': 'run', 'auto_resume': True, 'network_g': {'type': 'CDNSRNet'},
            'path': {'models': 'experiments/run/models', 'resume_state': None}
        }

    resumed = opt()
    with pytest.warns(UserWarning, match='200.state'):
        state = load_resume_state(resumed)
    assert state['iter'] == 100 and resumed['path']['resume_state'].endswith('100.state')
    assert resumed['path']['pretrain_network_g'] == 'experiments/run/models/net_g_100.pth'
    (states / '100.state').write_bytes(b'')
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as stopped:  # one message and exit 2
        load_resume_state(opt())
    assert stopped.value.code == 2
    assert re.search(r'no training state could be loaded: .*200\.state.*100\.state', capsys.readouterr().err)
    assert load_resume_state({'name': 'none', 'auto_resume': True, 'path': {}}) is None  # nothing to resume


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """A "billion laughs" option file (nine levels of nine aliases: 9^10 values once copied out) once ran 37 s
    into a MemoryError; both loaders now refuse it while reading, and ordinary anchors still work."""
    from cdnsr_plugin.compat import OptionFileError, load_yaml, patch_basicsr
    patch_basicsr()
    from basicsr.utils.options import ordered_yaml
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f'a{i}: &a{i} [' + ', '.join([f'*a{i - 1}'] * 9) + ']' for i in range(1, 10)]
    bomb = tmp_path / 'bomb.yml'
    bomb.write_text('\n'.join(lines) + '\n')
    with pytest.raises(OptionFileError, match='bomb.yml: not a usable option file: .*alias bomb'):
        load_yaml(str(bomb))
    with pytest.raises(yaml.YAMLError, match='alias bomb'):
        yaml.load(bomb.read_text(), Loader=ordered_yaml()[0])
    shared = yaml.load('base: &b {lr: 1.0e-3}\nstage1: *b\nstage2: *b\n', Loader=ordered_yaml()[0])
    assert shared['stage2']['lr'] == 1e-3


KILLED_WHILE_SAVING = """
import sys, types, torch
from basicsr.models.base_model import BaseModel
if sys.argv[2] == 'patched':
    from cdnsr_plugin.compat import atomic_checkpoints
    atomic_checkpoints()
net = torch.nn.Linear(4096, 4096)  # 64 MB of weights: each save takes a while
model = types.SimpleNamespace(opt={'path': {'models': sys.argv[1]}}, get_bare_model=lambda n: n)
BaseModel.save_network(model, net, 'net_g', 'latest')
print('saved', flush=True)
while True:
    with torch.no_grad():
        net.weight.add_(1)
    BaseModel.save_network(model, net, 'net_g', 'latest')
"""


def _kill_while_saving(folder: Path, mode: str, delays: list[float]) -> list[bool]:
    """Run BasicSR's ``save_network`` in a loop and SIGKILL it at each delay; whether the checkpoint loaded."""
    import subprocess
    import sys
    import time

    import torch
    loaded = []
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, '-c', KILLED_WHILE_SAVING, str(folder), mode], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == 'saved'
        time.sleep(delay)
        proc.kill()
        proc.wait()
        try:
            state = torch.load(folder / 'net_g_latest.pth', weights_only=True)['params']
            loaded.append(state['weight'].shape == (4096, 4096))
        except Exception:  # noqa: BLE001 (truncated)
            loaded.append(False)
    return loaded


@pytest.mark.slow
def test_a_kill_while_basicsr_saves_leaves_the_old_checkpoint_or_the_new_one(tmp_path):
    """Through ``atomic_checkpoints`` BasicSR's ``save_network`` writes to a temporary name and renames: a
    SIGKILL at any moment leaves a checkpoint that loads. Unpatched, the same kills leave truncated files."""
    delays = [0.4, 0.75, 1.1]
    (tmp_path / 'patched').mkdir()
    assert all(_kill_while_saving(tmp_path / 'patched', 'patched', delays))
    left = sorted(p.name for p in (tmp_path / 'patched').iterdir())  # at most the last kill's temporary file
    assert left[-1] == 'net_g_latest.pth' and len(left) <= 2 and all(name.endswith('.tmp') for name in left[:-1]), left
    (tmp_path / 'plain').mkdir()
    assert not all(_kill_while_saving(tmp_path / 'plain', 'plain', delays)), 'the unpatched save is not atomic'


def test_atomic_checkpoints_change_only_torch_save_for_basicsr():
    import torch
    from basicsr.models import base_model

    from cdnsr_plugin.compat import atomic_checkpoints
    atomic_checkpoints()
    assert base_model.torch.load is torch.load and base_model.torch.nn is torch.nn
    assert base_model.torch.save is not torch.save
