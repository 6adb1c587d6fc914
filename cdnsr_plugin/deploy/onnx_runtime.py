"""Run a routed network exported by ``tools/export_onnx.py`` (``deploy.onnx_export``) with onnxruntime on the CPU.

``load_exported(folder)`` returns an ``ExportedNet``: a ``torch.nn.Module`` with the interface that the one
routed executor (``inference.engine.RoutedEngine``) uses of a ``CDNSRNet`` -- ``classifier`` and ``branches``
(modules whose ``forward`` runs an onnxruntime session on numpy arrays), ``classify``, ``route``, ``scale``,
``num_classes`` -- so the engine, its regions, the cost knob and the tester run unchanged. What the engine
measures on torch modules (each branch's cost coefficients with ptflops, the halo with a float64 copy) cannot
be measured on an ONNX file; the export measured them on the torch network and the manifest carries them:
``cost_coefficients`` and ``resolve_halo`` (the engine asks for them when a network has them), and
``cost_table`` (the tester's per-tile costs).

Every file's sha256 is checked against the manifest before it is loaded (the bytes that are hashed are the
bytes that are loaded); a mismatch names the file. Only ``manifest.json`` and the ``.onnx`` files it names are
read. onnx and onnxruntime are optional (``pip install '.[onnx]'``); importing this module does not need them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cdnsr_plugin.archs.cdnsr_arch import CDNSRNet
from cdnsr_plugin.inference.costs import CONVENTIONS, Cost, CostTable
from cdnsr_plugin.inference.regions import EXACT

FORMAT = 'cdnsr-onnx'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
CLASSIFIER_FILE = 'classifier.onnx'
INPUT_NAME = 'lr'  # every exported part: float32 (N, C, H, W), RGB in [0, 1]
SR_OUTPUT = 'sr'  # branches: (N, C, H * scale, W * scale)
LOGITS_OUTPUT = 'logits'  # classifier: (N, M), before the softmax
INSTALL_HINT = "pip install '.[onnx]' (or: pip install onnx onnxruntime)"


class MissingOnnx(ValueError):
    """onnx or onnxruntime is not installed (a ``ValueError``: the command lines exit with status 2)."""


def branch_file(index: int) -> str:
    return f'branch{index}.onnx'


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or ``MissingOnnx`` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingOnnx(f'running an exported network needs onnxruntime, an optional dependency ({exc}): '
                          f'{INSTALL_HINT}') from None
    return onnxruntime


def read_manifest(folder: Path | str) -> dict:
    """``folder/manifest.json``, checked to be this format and version with the fields the runtime reads.

    Raises:
        FileNotFoundError: no folder or no manifest (not an export, or an export that failed its check).
        ValueError: another format, a newer version, or a missing field (named).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f'--onnx {folder} is not a folder; pass the folder tools/export_onnx.py wrote')
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist: {folder} is not an export of tools/export_onnx.py (an '
                                'export whose check against PyTorch failed writes no manifest)')
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f'{path} is not readable JSON ({exc}); export again with tools/export_onnx.py') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise ValueError(f'{path} is not a {FORMAT} manifest (written by tools/export_onnx.py)')
    if manifest.get('format_version') != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}; this plugin reads "
                         f'version {FORMAT_VERSION}: export again with this version of tools/export_onnx.py')
    for key in ('scale', 'num_classes', 'network_g', 'classifier', 'branches', 'costs', 'halo', 'engine'):
        if key not in manifest:
            raise ValueError(f'{path} has no {key!r}; export again with tools/export_onnx.py')
    if len(manifest['branches']) != manifest['num_classes']:
        raise ValueError(f"{path}: {len(manifest['branches'])} branches for {manifest['num_classes']} classes")
    return manifest


def _checked_bytes(folder: Path, entry: dict, part: str) -> bytes:
    """The bytes of ``entry['file']`` in ``folder``, if their sha256 is the manifest's."""
    name = entry.get('file')
    if not isinstance(name, str) or Path(name).name != name:
        raise ValueError(f'{folder / MANIFEST}: {part} names no file of the export folder ({name!r})')
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f'{path} ({part}) is missing from the export; export again with '
                                'tools/export_onnx.py')
    data = path.read_bytes()
    digest = sha256_of(data)
    if digest != entry.get('sha256'):
        raise ValueError(f"{path} ({part}) does not match the manifest: sha256 {digest[:16]}... instead of "
                         f"{str(entry.get('sha256'))[:16]}...; the file changed after the export. Export again "
                         'with tools/export_onnx.py')
    return data


class OnnxPart(nn.Module):
    """One exported part (the classifier or a branch) as a module: ``forward`` runs its onnxruntime session on
    the CPU in float32 and returns a tensor on the input's device and in its dtype."""

    def __init__(self, session: Any, name: str, empty_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.session, self.name = session, name
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self._empty_shape = empty_shape  # output shape per sample for an empty batch: (M,) or (C, scale, scale)

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # onnxruntime refuses some empty inputs; nothing to run
            shape = self._empty_shape if len(self._empty_shape) == 1 else (self._empty_shape[0],
                                                                           x.shape[2] * self._empty_shape[1],
                                                                           x.shape[3] * self._empty_shape[2])
            return x.new_empty((0, ) + tuple(shape))
        array = x.detach().to(device='cpu', dtype=torch.float32).contiguous().numpy()
        (out, ) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


class ExportedNet(nn.Module):
    """An exported routed network loaded for the engine (see the module docstring). Routing is hard (the
    engine's): each tile or region runs through one branch; there are no weights to train.

    Attributes:
        manifest: the export's ``manifest.json``.
        cost_coefficients: each branch's ``costs.full_image_coefficients`` as measured at export (what the engine
            multiplies by the pixels a branch processed).
    """

    routing = 'hard'
    route = CDNSRNet.route  # the same grouping of patches by label, batched per branch

    def __init__(self, folder: Path, manifest: dict, classifier: OnnxPart, branches: list[OnnxPart]) -> None:
        super().__init__()
        self.folder, self.manifest = folder, manifest
        self.scale, self.num_classes = int(manifest['scale']), int(manifest['num_classes'])
        self.classifier_opt = manifest['classifier'].get('options', {})
        self.branch_opts = [entry.get('options', {}) for entry in manifest['branches']]
        self.classifier = classifier
        self.branches = nn.ModuleList(branches)
        costs = manifest['costs']
        self.cost_patch = int(costs['patch'])
        self.cost_coefficients = [{c: tuple(row[c]) for c in CONVENTIONS} for row in costs['full_image_coefficients']]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, M)."""
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard routing of LR patches (N, C, h, w): SR patches and the classifier's probabilities."""
        probs = self.classify(x).softmax(dim=1)
        return self.route(x, probs.argmax(dim=1)), probs

    def resolve_halo(self, halo: Optional[int | str]) -> int:
        """The engine's halo (``regions.default_halo``) from what the export measured: ``None``, the backbone's
        default; ``'exact'``, the largest receptive radius of the branches; a number, itself."""
        if isinstance(halo, int) and not isinstance(halo, bool):
            return halo
        if halo not in (None, EXACT):
            raise ValueError(f'halo must be an integer >= 0, {EXACT!r} or empty (the default), got {halo!r}')
        key = 'default' if halo is None else 'exact'
        value = self.manifest['halo'].get(key)
        if value is None:
            raise ValueError(f"{self.folder / MANIFEST}: the export has no {key} halo "
                             f"({self.manifest['halo'].get('note', 'not measurable')}); pass --halo N "
                             '(tools/measure_halo.py finds one on the torch network)')
        return int(value)

    def cost_table(self, patch: int) -> CostTable:
        """The per-tile costs measured at export (``costs.cost_table`` of the torch network); only for the
        export's patch, the one they were measured at."""
        if patch != self.cost_patch:
            raise ValueError(f'the export at {self.folder} measured its per-tile costs at patch {self.cost_patch}, '
                             f'not {patch}: run with --patch {self.cost_patch}, or export again with --patch {patch}')
        costs = self.manifest['costs']
        fields = ('name', 'macs', 'paper_flops', 'params')
        classifier = Cost(**{key: costs['classifier'][key] for key in fields}) if costs.get('classifier') else None
        branches = tuple(Cost(**{key: row[key] for key in fields}) for row in costs['branches'])
        return CostTable(self.cost_patch, self.scale, classifier, branches)


def load_exported(folder: Path | str, threads: Optional[int] = None) -> ExportedNet:
    """The export in ``folder`` as an ``ExportedNet`` on onnxruntime's CPU provider.

    Args:
        folder: what ``tools/export_onnx.py`` wrote (``manifest.json``, ``classifier.onnx``, ``branch<i>.onnx``).
        threads: onnxruntime's intra-op threads; default: torch's (``torch.get_num_threads()``, which the
            tester's ``--threads`` sets), so both backends use the same number.

    Raises:
        FileNotFoundError: no manifest, or a file it names is missing.
        ValueError: a file's sha256 differs from the manifest's (the file is named), another format, or
            onnxruntime is missing (``MissingOnnx``).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    data = {'classifier': _checked_bytes(folder, manifest['classifier'], 'classifier')}
    for i, entry in enumerate(manifest['branches']):
        data[f'branch{i}'] = _checked_bytes(folder, entry, f'branch{i}')
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only

    def session(name: str) -> Any:
        try:
            return ort.InferenceSession(data[name], sess_options=options, providers=['CPUExecutionProvider'])
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own exception types)
            raise ValueError(f'onnxruntime cannot load {name} of {folder} ({exc})') from None

    scale, channels = int(manifest['scale']), int(manifest.get('num_out_ch', 3))
    classifier = OnnxPart(session('classifier'), CLASSIFIER_FILE, (int(manifest['num_classes']), ))
    branches = [
        OnnxPart(session(f'branch{i}'), branch_file(i), (channels, scale, scale))
        for i in range(len(manifest['branches']))
    ]
    return ExportedNet(folder, manifest, classifier, branches).eval()
