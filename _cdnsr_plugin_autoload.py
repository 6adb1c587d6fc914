"""Register cdnsr_plugin into basicsr whenever basicsr is imported, without editing basicsr.

Installed with the plugin, the file ``cdnsr_plugin-autoload.pth`` in site-packages runs
``import _cdnsr_plugin_autoload`` at interpreter start-up. This module imports nothing heavy: it
only puts a finder on ``sys.meta_path`` that waits for the first ``import basicsr``. When that
happens it (1) installs the torchvision alias basicsr 1.4.2 needs, (2) lets basicsr import as
usual, (3) imports ``cdnsr_plugin``, whose import registers the plugin's archs, models, losses
and datasets into basicsr's registries, and (4) only if the program is BasicSR's own ``basicsr/train.py``
or ``basicsr/test.py``, applies ``cdnsr_plugin.compat.patch_basicsr`` (safe YAML loading of option files,
atomic checkpoint writes, gloo DDP without GPUs; see compat.py) and, for train.py, checks the training
options before any folder is created (``cdnsr_plugin.models.option_check``). That is why BasicSR's stock
``basicsr/train.py`` finds ``type: CDNSRNet`` in an option file; any other program that imports basicsr
gets it unpatched.

Turn it off with the environment variable ``CDNSR_PLUGIN_AUTOLOAD=0`` (then ``import
cdnsr_plugin`` yourself, or use ``python -m cdnsr_plugin.train``).
"""
import os
import sys
import warnings
from importlib.abc import Loader, MetaPathFinder

ENV_VAR = 'CDNSR_PLUGIN_AUTOLOAD'


class _AfterBasicsrLoader(Loader):
    """Wraps basicsr's own loader: runs it, then imports the plugin."""

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        try:
            from cdnsr_plugin.compat import alias_functional_tensor
            alias_functional_tensor()
        except Exception:  # the plugin is broken or half-uninstalled: let basicsr speak for itself
            pass
        self._wrapped.exec_module(module)
        try:
            import cdnsr_plugin  # noqa: F401  (registration is the import's side effect)
            if running_basicsr_script():
                from cdnsr_plugin.compat import patch_basicsr
                patch_basicsr()
                if os.path.basename(sys.argv[0]) == 'train.py':
                    from cdnsr_plugin.models.option_check import check_before_folders
                    check_before_folders()
        except Exception as exc:  # never break basicsr for its other users
            warnings.warn(f'cdnsr_plugin could not register itself into basicsr ({exc!r}); '
                          f'plugin types will be missing. Set {ENV_VAR}=0 to silence this.')

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


def running_basicsr_script() -> bool:
    """Whether this program is BasicSR's own ``basicsr/train.py`` or ``basicsr/test.py`` (a BasicSR checkout)."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else ''
    path = os.path.abspath(script)
    return os.path.basename(path) in ('train.py', 'test.py') and os.path.basename(os.path.dirname(path)) == 'basicsr'


class _BasicsrFinder(MetaPathFinder):
    """Finds ``basicsr`` the normal way and swaps in the wrapping loader, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'basicsr':
            return None
        uninstall()
        for finder in sys.meta_path:  # whichever finder would have found it (site, editable, ...)
            find_spec = getattr(finder, 'find_spec', None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AfterBasicsrLoader(spec.loader)
                return spec
        return None


_FINDER = _BasicsrFinder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` unless disabled or basicsr is already imported."""
    if os.environ.get(ENV_VAR, '1').strip().lower() in ('0', 'false', 'no', 'off'):
        return
    if 'basicsr' not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


install()
