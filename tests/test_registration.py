"""Registration into basicsr, the start-up hook, the compat layer."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

import cdnsr_plugin
from cdnsr_plugin.registry import register

PLUGIN_ARCHS = {'FSRCNN', 'CARN', 'PatchClassifier', 'CDNSRNet'}
PTH_INSTALLED = (Path(sysconfig.get_paths()['purelib']) / 'cdnsr_plugin-autoload.pth').is_file()
needs_pth = pytest.mark.skipif(not PTH_INSTALLED and not os.environ.get('CDNSR_REQUIRE_AUTOLOAD'),
                               reason='start-up hook not installed (editable install); use pip install .')


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd='/')


def test_import_registers_every_arch_as_the_plugin_class():
    names = cdnsr_plugin.registered_names()
    assert set(names['arch']) == PLUGIN_ARCHS
    for name in PLUGIN_ARCHS:
        assert ARCH_REGISTRY.get(name).__module__.startswith('cdnsr_plugin.')


def test_plain_basicsr_has_none_of_the_plugin_names():
    """No clash: BasicSR on its own (hook off, plugin never imported) owns none of our names."""
    code = ('import sys, torchvision.transforms.functional as F; '
            "sys.modules['torchvision.transforms.functional_tensor'] = F; "
            'import basicsr; from basicsr.utils import registry as r; '
            "names = {n for reg in (r.ARCH_REGISTRY, r.MODEL_REGISTRY, r.LOSS_REGISTRY, r.DATASET_REGISTRY) "
            "for n in reg.keys()}; print(sorted(names & set(sys.argv[1:])), 'cdnsr_plugin' in sys.modules)")
    names = sorted(set().union(*cdnsr_plugin.registered_names().values()))
    result = subprocess.run([sys.executable, '-c', code, *names], capture_output=True, text=True,
                            env={**os.environ, 'CDNSR_PLUGIN_AUTOLOAD': '0'}, cwd='/')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['[]', 'False']


@needs_pth
def test_importing_basicsr_alone_registers_the_plugin():
    result = run_python('import basicsr; from basicsr.utils.registry import ARCH_REGISTRY as A; '
                        "print('CDNSRNet' in A, 'FSRCNN' in A)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', 'True']


@needs_pth
def test_hook_can_be_turned_off():
    result = run_python('import sys, torchvision.transforms.functional as F; '
                        "sys.modules['torchvision.transforms.functional_tensor'] = F; "
                        'import basicsr; from basicsr.utils.registry import ARCH_REGISTRY as A; '
                        "print('CDNSRNet' in A, 'cdnsr_plugin' in sys.modules)", CDNSR_PLUGIN_AUTOLOAD='0')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['False', 'False']


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
    from basicsr.utils.options import ordered_yaml
    marker = tmp_path / 'pwned'
    evil = f'name: x\nhack: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(yaml.YAMLError):
        yaml.load(evil, Loader=ordered_yaml()[0])
    assert not marker.exists()
    opt = yaml.load('b: 1\na: !!float 2e-4\nc: {d: 1}\n', Loader=ordered_yaml()[0])
    assert list(opt) == ['b', 'a', 'c'] and opt['a'] == 2e-4 and type(opt).__name__ == 'OrderedDict'
