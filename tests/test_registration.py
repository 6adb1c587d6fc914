"""Registration into basicsr, the start-up hook, the compat layer."""
import pytest
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

import cdnsr_plugin
from cdnsr_plugin.registry import register

PLUGIN_ARCHS = {'FSRCNN', 'CARN', 'PatchClassifier', 'CDNSRNet'}


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
