"""The start-up hook and the import's side effects, in fresh interpreters."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import cdnsr_plugin

pytestmark = pytest.mark.slow
PTH_INSTALLED = (Path(sysconfig.get_paths()['purelib']) / 'cdnsr_plugin-autoload.pth').is_file()
needs_pth = pytest.mark.skipif(
    not PTH_INSTALLED and not os.environ.get('CDNSR_REQUIRE_AUTOLOAD'),
    reason='start-up hook not installed (editable install); use pip install .')


def run_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code, *args],
                          capture_output=True,
                          text=True,
                          env={**os.environ, **env},
                          cwd='/')


def test_plain_basicsr_has_none_of_the_plugin_names():
    """No clash: BasicSR on its own (hook off, plugin never imported) owns none of our names."""
    code = ('import sys, torchvision.transforms.functional as F; '
            "sys.modules['torchvision.transforms.functional_tensor'] = F; "
            'import basicsr; from basicsr.utils import registry as r; '
            "names = {n for reg in (r.ARCH_REGISTRY, r.MODEL_REGISTRY, r.LOSS_REGISTRY, r.DATASET_REGISTRY) "
            "for n in reg.keys()}; print(sorted(names & set(sys.argv[1:])), 'cdnsr_plugin' in sys.modules)")
    names = sorted(set().union(*cdnsr_plugin.registered_names().values()))
    result = subprocess.run([sys.executable, '-c', code, *names],
                            capture_output=True,
                            text=True,
                            env={**os.environ, 'CDNSR_PLUGIN_AUTOLOAD': '0'},
                            cwd='/')
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
    result = run_python(
        'import sys, torchvision.transforms.functional as F; '
        "sys.modules['torchvision.transforms.functional_tensor'] = F; "
        'import basicsr; from basicsr.utils.registry import ARCH_REGISTRY as A; '
        "print('CDNSRNet' in A, 'cdnsr_plugin' in sys.modules)",
        CDNSR_PLUGIN_AUTOLOAD='0')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['False', 'False']


UNPATCHED = ('import {imports}; from basicsr.utils import options, dist_util; import basicsr.train as train; '
             "print(*[bool(getattr(f, '_cdnsr_' + k, False)) for f, k in ((options.ordered_yaml, 'safe'), "
             "(train.load_resume_state, 'cpu'), (dist_util._init_dist_pytorch, 'cpu'))])")


def test_importing_the_plugin_changes_nothing_in_basicsr_but_registries():
    """``import cdnsr_plugin`` registers; the YAML, resume and DDP patches belong to the entries."""
    result = run_python(UNPATCHED.format(imports='cdnsr_plugin'), CDNSR_PLUGIN_AUTOLOAD='0')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['False', 'False', 'False']
    patched = run_python(
        UNPATCHED.format(imports='cdnsr_plugin; from cdnsr_plugin.compat import patch_basicsr; '
                         'patch_basicsr()'),
        CDNSR_PLUGIN_AUTOLOAD='0')
    assert patched.stdout.split() == ['True', 'True', 'True']


@needs_pth
@pytest.mark.parametrize('script,patched', [('basicsr/train.py', True), ('basicsr/test.py', True),
                                            ('tools/train.py', False), ('basicsr/other.py', False)])
def test_hook_patches_only_basicsr_own_scripts(tmp_path, script, patched):
    path = tmp_path / script
    path.parent.mkdir(parents=True)
    path.write_text(UNPATCHED.format(imports='basicsr').replace('; ', '\n'))
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(patched)] * 3
