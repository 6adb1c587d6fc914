"""Export a routed network (``CDNSRNet``) to ONNX: the classifier and each branch apart, plus a routing manifest.

Tracing the routed network as one graph would freeze the router (the branch each patch takes is data-dependent
control flow), so each part is exported on its own and the routing stays on the host: the engine
(``inference.engine.RoutedEngine``) classifies, decides and plans the regions, and runs the exported parts
through ``deploy.onnx_runtime.ExportedNet``. What ``export`` writes into its folder:

* ``classifier.onnx``: input ``lr`` float32 (N, C, H, W), RGB in [0, 1] (the plugin's ``PatchClassifier`` is
  trained on such LR patches; the engine gives it ``patch x patch`` tiles), output ``logits`` (N, M) before the
  softmax;
* ``branch<i>.onnx``, branch 0 the cheapest: input ``lr`` as above, output ``sr`` (N, C, H * scale, W * scale);
* ``manifest.json`` (written last, atomically): format and version, scale and classes, the network options
  and each part's arch options, the engine's defaults (patch, stride), the halos the engine would use on the
  torch network (``regions.default_halo``: the backbone's default and the exact receptive radius), the
  per-tile cost table and each branch's whole-image cost coefficients (``inference.costs``: what the engine
  plans with and reports as executed FLOPs), each file's sha256, the check against PyTorch, versions and the
  command.

Every part has dynamic batch, height and width. The exporter is torch's TorchScript-based one
(``dynamo=False``): it needs only ``onnx`` (the ``dynamo`` exporter also needs ``onnxscript``, which the
``onnx`` extra does not install). Opset 17 by default: supported by onnxruntime >= 1.12 and by most other
runtimes; the plugin's FSRCNN (``ConvTranspose``, ``PRelu``), CARN (grouped convolutions, pixel shuffle as
``DepthToSpace``), BasicSR's MSRResNet (pixel shuffle, bilinear ``Resize``) and RCAN (global average pooling)
export at opsets 13 to 20.

Before the manifest is written every file is run with onnxruntime on random inputs of two sizes (by default
2 x ``patch`` x ``patch`` and an odd 1 x 31 x 45) and compared with the torch part: a maximum absolute
difference above ``tolerance`` (1e-4), a non-finite output or a shape that differs refuses the export, the
files written by it are removed and no manifest is written.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from cdnsr_plugin.deploy.onnx_runtime import (CLASSIFIER_FILE, FORMAT, FORMAT_VERSION, INPUT_NAME, INSTALL_HINT,
                                              LOGITS_OUTPUT, MANIFEST, SR_OUTPUT, MissingOnnx, branch_file,
                                              require_onnxruntime, sha256_of)
from cdnsr_plugin.inference.costs import cost_table, full_image_coefficients
from cdnsr_plugin.inference.regions import DEFAULT_HALO, EXACT, default_halo
from cdnsr_plugin.utils.io import atomic_write, write_json

DEFAULT_OPSET = 17
MIN_OPSET = 13  # pixel shuffle as DepthToSpace (mode CRD) and the other ops used here
TOLERANCE = 1e-4
CHECK_SIZES = ((2, None, None), (1, 31, 45))  # (batch, height, width); None: the patch side


def require_onnx() -> Any:
    """The ``onnx`` module, or ``MissingOnnx`` saying how to install the extra."""
    try:
        import onnx
    except ImportError as exc:
        raise MissingOnnx(f'ONNX export needs onnx and onnxruntime, optional dependencies ({exc}): '
                          f'{INSTALL_HINT}') from None
    return onnx


def _exported_files(folder: Path) -> list[Path]:
    """What an earlier export left in ``folder`` (only these are replaced by ``overwrite``)."""
    names = {MANIFEST, CLASSIFIER_FILE}
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name in names or (p.name.startswith('branch') and p.suffix == '.onnx' and p.stem[len('branch'):].isdigit())))


def prepare_folder(folder: Path, overwrite: bool) -> None:
    """``folder`` must be new or empty; with ``overwrite`` an earlier export's files (the manifest first, so a
    failed export never leaves a manifest beside other files) are removed and anything else stays."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'--out {folder} is a file, not a folder')
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(f'--out {folder} is not empty: choose a new folder, or pass --overwrite to replace an '
                             'earlier export there (only its manifest.json, classifier.onnx and branch<i>.onnx)')
        for path in _exported_files(folder):
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _check_network(net: nn.Module) -> None:
    for name in ('classifier', 'branches', 'scale', 'num_classes'):
        if not hasattr(net, name):
            raise ValueError(f'{type(net).__name__} has no {name!r}: export a routed network (CDNSRNet: a classifier '
                             'and its branches)')


def _to_onnx(part: nn.Module, example: torch.Tensor, output: str, opset: int) -> bytes:
    """``part`` as ONNX bytes, dynamic in batch, height and width, by torch's TorchScript-based exporter."""
    axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
    axes[output] = {0: 'batch'} if output == LOGITS_OUTPUT else {0: 'batch', 2: 'sr_height', 3: 'sr_width'}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is deprecated in favour of dynamo=True (which needs onnxscript)
        warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
        warnings.filterwarnings('ignore', message='.*feature will be removed.*')
        with torch.no_grad():
            torch.onnx.export(
                part, (example, ),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output],
                dynamic_axes=axes,
                do_constant_folding=True)
    return buffer.getvalue()


def compare_with_torch(part: nn.Module,
                       data: bytes,
                       name: str,
                       sizes: Sequence[tuple[int, int, int]],
                       channels: int,
                       tolerance: float,
                       seed: int = 0) -> float:
    """Largest absolute difference between ``part`` and its ONNX ``data`` run by onnxruntime (CPU) on uniform
    [0, 1) inputs of ``sizes`` (batch, height, width). Raises ``ValueError`` naming ``name`` when shapes differ,
    an output is not finite or the difference exceeds ``tolerance``."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=options, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, height, width in sizes:
        x = torch.rand(batch, channels, height, width, generator=generator)
        with torch.no_grad():
            expected = part(x).numpy()
        (got, ) = session.run(None, {INPUT_NAME: x.numpy()})
        where = f'{name} on a {batch}x{channels}x{height}x{width} input'
        if got.shape != expected.shape:
            raise ValueError(f'{where}: onnxruntime gives shape {got.shape}, PyTorch {expected.shape}')
        if not (np.isfinite(got).all() and np.isfinite(expected).all()):
            raise ValueError(f'{where}: non-finite outputs (NaN or inf; PyTorch finite: '
                             f'{bool(np.isfinite(expected).all())}): check the weights')
        diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
        if diff > tolerance:
            raise ValueError(f'{where}: onnxruntime differs from PyTorch by {diff:.3g} > {tolerance:g}')
        worst = max(worst, diff)
    return worst


def _halos(branches: Sequence[nn.Module], patch: int, exact: bool) -> dict[str, Any]:
    """The engine's halos (``regions.default_halo`` at the engine's probe size), ``None`` where there is none
    (``exact`` False: the exact radius is not measured)."""
    size = max(64, 4 * patch)  # as RoutedEngine.halo measures
    backbone = type(branches[-1]).__name__
    notes = {
        'default': f'regions.DEFAULT_HALO[{backbone!r}]'
        if backbone in DEFAULT_HALO else 'the measured receptive radius',
        'exact': 'the largest receptive radius of the branches' if exact else 'not measured (--no-exact-halo)'
    }
    halos: dict[str, Any] = {'default': None, 'exact': None}
    for key, request in (('default', None), ('exact', EXACT))[:2 if exact else 1]:
        try:
            halos[key] = default_halo(branches, request, size=size)
        except ValueError as error:
            notes[key] = str(error)
    halos['note'] = '; '.join(f'{key}: {note}' for key, note in notes.items())
    return halos


def export(net: nn.Module,
           folder: Path | str,
           network: Optional[dict] = None,
           opset: int = DEFAULT_OPSET,
           patch: int = 32,
           stride: int = 28,
           overwrite: bool = False,
           command: Optional[str] = None,
           tolerance: float = TOLERANCE,
           num_in_ch: int = 3,
           exact_halo: bool = True) -> dict:
    """Write the classifier, each branch and the manifest of ``net`` into ``folder`` (see the module docstring).

    Args:
        net: a ``CDNSRNet`` (not modified: a float32 CPU copy in eval mode is exported).
        folder: new or empty folder (``overwrite``: an earlier export there is replaced).
        network: the ``network_g`` options ``net`` was built from (recorded); default: rebuilt from ``net``.
        opset: ONNX opset, at least ``MIN_OPSET``.
        patch, stride: the engine's tile side and the papers' tile step (recorded as defaults; the per-tile
            costs are measured at ``patch``).
        command: the command line recorded in the manifest; default ``sys.argv``.
        tolerance: largest absolute difference from PyTorch accepted by the check.
        exact_halo: measure the exact halo (each branch's receptive radius: two float64 passes on a 128x128
            input per branch, minutes for RCAN-size branches); without it ``halo: exact`` is refused on the export.

    Returns:
        The manifest.

    Raises:
        MissingOnnx: onnx or onnxruntime is not installed.
        ValueError: a bad argument, a non-empty ``folder``, or a part that fails the check (named).
    """
    _check_network(net)
    onnx = require_onnx()
    require_onnxruntime()
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f'opset must be an integer >= {MIN_OPSET}, got {opset!r}')
    for name, value in (('patch', patch), ('stride', stride)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if stride > patch:
        raise ValueError(f'stride ({stride}) must be <= patch ({patch})')
    folder = Path(folder)
    prepare_folder(folder, overwrite)
    model = copy.deepcopy(net).float().cpu().eval()
    sizes = [(b, h or patch, w or patch) for b, h, w in CHECK_SIZES]
    parts = [('classifier', CLASSIFIER_FILE, model.classifier, LOGITS_OUTPUT)]
    parts += [(f'branch{i}', branch_file(i), branch, SR_OUTPUT) for i, branch in enumerate(model.branches)]
    written: list[Path] = []
    entries: dict[str, dict] = {}
    try:
        for name, file_name, part, output in parts:
            example = torch.rand(1, num_in_ch, patch, patch, generator=torch.Generator().manual_seed(1))
            try:
                data = _to_onnx(part, example, output, opset)
                onnx.checker.check_model(onnx.load_from_string(data))
            except Exception as exc:  # noqa: BLE001 (the exporter and checker raise many types)
                raise ValueError(f'{name} ({type(part).__name__}) cannot be exported to ONNX at opset {opset}: '
                                 f'{type(exc).__name__}: {exc}') from exc
            written.append(atomic_write(folder / file_name, data))
            diff = compare_with_torch(part, data, f'{folder / file_name} ({name})', sizes, num_in_ch, tolerance)
            entries[name] = {'file': file_name, 'sha256': sha256_of(data), 'max_abs_diff': diff}
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    table = cost_table(model, patch=patch, num_in_ch=num_in_ch)
    costs = table.to_dict()
    costs['probe'] = patch
    costs['full_image_coefficients'] = [full_image_coefficients(b, patch, num_in_ch) for b in model.branches]
    costs['full_image_coefficients_note'] = ('per branch and convention (a, b): cost of one pass on an image of P '
                                             'LR pixels = a * P + b (costs.full_image_coefficients)')
    with torch.no_grad():
        num_out_ch = int(model.branches[0](torch.zeros(1, num_in_ch, 8, 8)).shape[1])
    network = dict(network) if network else {
        'type': type(net).__name__, 'classifier': net.classifier_opt, 'branches': net.branch_opts, 'scale': int(
            net.scale), 'routing': getattr(net, 'routing', 'hard')
    }
    manifest = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'command': command if command is not None else ' '.join(sys.argv),
        'versions': {
            'torch': torch.__version__, 'onnx': onnx.__version__, 'onnxruntime': require_onnxruntime().__version__
        },
        'exporter': 'torch.onnx.export (TorchScript-based, dynamo=False)',
        'opset': opset,
        'scale': int(net.scale),
        'num_classes': int(net.num_classes),
        'num_in_ch': num_in_ch,
        'num_out_ch': num_out_ch,
        'network_g': network,
        'input': {
            'name': INPUT_NAME, 'dtype': 'float32', 'layout': 'NCHW', 'color': 'RGB', 'range': [0.0, 1.0],
            'dynamic_axes': ['batch', 'height', 'width']
        },
        'classifier': {
            **entries['classifier'], 'options': getattr(net, 'classifier_opt', None), 'output': LOGITS_OUTPUT,
            'input_convention': 'LR RGB patches in [0, 1], the engine gives it patch x patch tiles (replicated at '
            'the image border); output: logits (N, num_classes) before the softmax'
        },
        'branches': [{
            **entries[f'branch{i}'], 'index': i, 'name': costs['branches'][i]['name'], 'options': opts,
            'output': SR_OUTPUT
        } for i, opts in enumerate(getattr(net, 'branch_opts', [None] * len(model.branches)))],
        'branch_order': 'cost order: branch 0 the cheapest, the last one the backbone (the largest)',
        'engine': {'patch': patch, 'stride': stride},
        'halo': _halos(model.branches, patch, exact_halo),
        'costs': costs,
        'check': {
            'tolerance': tolerance, 'sizes': [list(s) for s in sizes], 'backend': 'onnxruntime CPUExecutionProvider'
        },
    }
    write_json(folder / MANIFEST, manifest)
    return manifest
