"""Reference weights shipped with the package, ready to run (``cdnsr-sr --model NAME``, ``cdnsr-demo``).

Each model ``NAME`` is three files in this folder:

* ``NAME.pth``: a BasicSR checkpoint ``{'params': state_dict}`` of a ``CDNSRNet`` (load with
  ``weights_only=True``);
* ``NAME.yml``: its ``network_g`` option file (as ``options/networks/*.yml``; ``tools/test_patches.py
  --network``);
* ``NAME.json``: the manifest: the sha256 of the ``.pth`` (``sha256``) and of the ``.yml``
  (``network_sha256``), the command, option file, data (and its terms),
  iterations, date and machine that trained it, the default routing (``routing.set_budget``: FLOPs over a
  folder, ``routing.budget``: per image, both ``null``: the classifier's own decision), and its figures on the
  held-out photos of ``../shared/data/photos`` (PSNR on Y, executed FLOPs in % of the backbone on the whole
  image, routed / whole-image wall time) plus one figure on a scikit-image photo that the tests reproduce.

``checkpoint(name)`` and ``network_file(name)`` check the sha256 before handing out the path, so a damaged
or replaced file is named instead of silently producing other images. Only the names ``names()`` lists are
models (``--model ../x`` reads nothing), a manifest's files are plain names in this folder, and a manifest that
is not valid JSON or lacks a field or checksum is refused naming the file (``--list`` still lists the others).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import numpy as np

FOLDER = Path(__file__).resolve().parent
DEFAULT_MODEL = 'cdnsr_carn_x4_gain'

REINSTALL = 'reinstall the package (pip install .)'
FILE_FIELDS = {'checkpoint': 'sha256', 'network': 'network_sha256'}  # file field -> the field of its sha256


def names() -> list[str]:
    """Models shipped in this folder (those with a manifest): the only names ``manifest`` accepts."""
    return sorted(path.stem for path in FOLDER.glob('*.json'))


def manifest_path(name: str) -> Path:
    """The manifest file of the shipped model ``name``; ``ValueError`` naming the shipped models for any other
    name (a path such as ``../x`` included: nothing is read outside this folder)."""
    shipped = names()
    if not isinstance(name, str) or name not in shipped:
        raise ValueError(f'no shipped model named {name!r}; shipped: {", ".join(shipped) or "none"} (cdnsr-sr '
                         '--list; or give your own --network and --checkpoint to tools/test_patches.py)')
    return FOLDER / f'{name}.json'


def _problems(info: object) -> list[str]:
    """What makes a parsed manifest unusable (empty if nothing)."""
    if not isinstance(info, dict):
        return [f'it holds a {type(info).__name__}, not a mapping']
    problems = []
    for field, digest in FILE_FIELDS.items():
        value = info.get(field)
        if not isinstance(value, str) or not value or Path(value).name != value or value in ('.', '..'):
            problems.append(f'{field} must name a file of this folder, got {value!r}')
        if digest not in info:
            problems.append(f'no {digest} (the sha256 that guards its {field} file {value})')
        elif not isinstance(info[digest], str) or not re.fullmatch(r'[0-9a-f]{64}', info[digest]):
            problems.append(f'{digest} is not a sha256 (64 hex digits): {info[digest]!r}')
    if not isinstance(info.get('routing'), dict):
        problems.append(f"routing must be a mapping, got {info.get('routing')!r}")
    return problems


def manifest(name: str) -> dict[str, Any]:
    """The manifest of ``name``, checked: ``ValueError`` naming the shipped models for another name, or naming
    the manifest file when it cannot be read, is not JSON (truncated?) or lacks a file name or checksum."""
    path = manifest_path(name)
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
    except OSError as exc:
        raise ValueError(f'{path} cannot be read ({exc.strerror or exc}); {REINSTALL}') from None
    except UnicodeDecodeError:
        raise ValueError(f'{path} is not text: the file is damaged; {REINSTALL}') from None
    except ValueError as exc:
        raise ValueError(f'{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}: '
                         f'truncated or edited?); {REINSTALL}') from None
    problems = _problems(info)
    if problems:
        raise ValueError(f'{path} is not a usable model manifest: {"; ".join(problems)}; {REINSTALL}')
    return info


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _checked(name: str, field: str) -> Path:
    """The file ``field`` of ``name``'s manifest, after checking it against the manifest's sha256."""
    info = manifest(name)
    path = FOLDER / info[field]
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing from the installed package; {REINSTALL}')
    found, expected = sha256(path), info[FILE_FIELDS[field]]
    if found != expected:
        raise ValueError(f'{path} does not match its manifest (sha256 {found[:12]}..., expected {expected[:12]}...): '
                         f'the file was changed or damaged; {REINSTALL}')
    return path


def checkpoint(name: str) -> Path:
    """The weights of ``name``, after checking them against the manifest's sha256."""
    return _checked(name, 'checkpoint')


def network_file(name: str) -> Path:
    """The ``network_g`` option file of ``name``, after checking it against the manifest's ``network_sha256``."""
    return _checked(name, 'network')


def routing(name: str) -> str:
    """How ``name`` routes by default, in words: the classifier's own decision or a cost knob."""
    info = manifest(name)['routing']
    if info.get('set_budget') is not None:
        return (f"a set budget of {info['set_budget']:g} (at most {100 * info['set_budget']:g}% of the backbone's "
                'FLOPs over the folder, where the classifier sees most need)')
    budget = info.get('budget')
    return "the classifier's own decision (argmax)" if budget is None else f'budget {budget:g}'


def tester_args(name: str,
                budget: Optional[float] = None,
                set_budget: Optional[float] = None,
                argmax: bool = False) -> list[str]:
    """The ``tools/test_patches.py`` flags that run ``name`` as shipped: its network file, its sha256-checked
    weights and its routing. ``budget`` (per image), ``set_budget`` (over a folder) or ``argmax`` (the
    classifier's own decision) override the manifest's routing; at most one may be given."""
    if sum((budget is not None, set_budget is not None, argmax)) > 1:
        raise ValueError('give at most one of --budget, --set-budget and --argmax')
    info = manifest(name)
    routing_info = info['routing']
    if routing_info.get('budget') is not None and routing_info.get('set_budget') is not None:
        raise ValueError(f'the manifest of {name} sets both routing.budget and routing.set_budget; it must set at '
                         'most one (reinstall the package, or fix the manifest)')
    if budget is None and set_budget is None and not argmax:
        budget, set_budget = routing_info.get('budget'), routing_info.get('set_budget')
    argv = [
        '--network',
        str(network_file(name)), '--checkpoint',
        str(checkpoint(name)), '--convention',
        routing_info.get('convention', 'paper')
    ]
    if set_budget is not None:
        return argv + ['--set-budget', str(set_budget)]
    return argv + ([] if budget is None else ['--budget', str(budget)])


CHECK_PHOTO = 'astronaut'  # scikit-image ships it: tests reproduce each manifest's figure on it without ../shared


def check_photo() -> np.ndarray:
    """scikit-image's ``CHECK_PHOTO`` as uint8 BGR."""
    import numpy as np
    from skimage import data
    return np.ascontiguousarray(getattr(data, CHECK_PHOTO)()[..., ::-1])


def check_pair() -> tuple[np.ndarray, np.ndarray]:
    """``(lr, hr)`` uint8 BGR: ``check_photo`` cropped to a multiple of 4, and its MATLAB-bicubic x4 downscale
    (the held-out photos' degradation)."""
    from cdnsr_plugin.utils.image import bicubic_pair
    return bicubic_pair(check_photo(), 4)


def write_check_pair(folder: Path) -> tuple[Path, Path]:
    """``check_pair`` as ``folder/lr/<photo>.png`` and ``folder/hr/<photo>.png``; returns the two folders."""
    from cdnsr_plugin.utils.io import write_bicubic_pair
    write_bicubic_pair(check_photo(), CHECK_PHOTO, folder / 'hr', folder / 'lr', 4)
    return folder / 'lr', folder / 'hr'
