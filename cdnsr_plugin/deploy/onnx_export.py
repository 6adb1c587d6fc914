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
  plans with and reports as executed FLOPs), each file's sha256, the check against PyTorch, versions, the
  command, an ``export_id`` and ``manifest_sha256``, the manifest's own checksum (sha256 of each key's value as
  canonical JSON: ``onnx_runtime.manifest_checksums``).

Each ``.onnx`` file records in its ``metadata_props`` (keys ``cdnsr.*``, ``onnx_runtime.part_facts``) its role
(classifier or branch), its branch index, the scale, the classes and channels, its per-tile costs and
whole-image cost coefficients, its options and the ``export_id``: ``onnx_runtime.load_exported`` refuses a
manifest that disagrees with its checksum, its files' sha256, their metadata or their output shape on a probe.

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

The folder is an output: the export holds ``utils.locks.RunLock`` on it (``<folder>.lock``; a second export into
it fails at once, naming the first) and writes every file into a staging folder inside it
(``.export_onnx.partial``), moved into place only once every part has passed its check, the manifest last. So
a failed export leaves the folder as it was (an earlier export included); ``overwrite`` replaces only an
earlier export recognised by its manifest (the manifest and the files it names, with their sha256) and refuses,
changing nothing, a folder that holds anything else.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import os
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from cdnsr_plugin.deploy.onnx_runtime import (CHECKSUMS, CLASSIFIER_FILE, FORMAT, FORMAT_VERSION, INPUT_NAME,
                                              INSTALL_HINT, LOGITS_OUTPUT, MANIFEST, SR_OUTPUT, MissingOnnx,
                                              branch_file, manifest_checksums, part_facts, require_onnxruntime,
                                              sha256_of)
from cdnsr_plugin.inference.costs import cost_table, full_image_coefficients
from cdnsr_plugin.inference.regions import DEFAULT_HALO, EXACT, default_halo
from cdnsr_plugin.utils.io import atomic_write, jsonable, write_json
from cdnsr_plugin.utils.locks import RunLock

DEFAULT_OPSET = 17
MIN_OPSET = 13  # pixel shuffle as DepthToSpace (mode CRD) and the other ops used here
TOLERANCE = 1e-4
CHECK_SIZES = ((2, None, None), (1, 31, 45))  # (batch, height, width); None: the patch side
STAGING = '.export_onnx.partial'  # inside the export folder, while the parts are written and checked


def require_onnx() -> Any:
    """The ``onnx`` module, or ``MissingOnnx`` saying how to install the extra."""
    try:
        import onnx
    except ImportError as exc:
        raise MissingOnnx(f'ONNX export needs onnx and onnxruntime, optional dependencies ({exc}): '
                          f'{INSTALL_HINT}') from None
    return onnx


def _refuse_overwrite(folder: Path, reason: str) -> ValueError:
    return ValueError(f'--out {folder} {reason}; --overwrite replaces only an earlier export of tools/export_onnx.py '
                      '(its manifest.json and the files it names) and leaves everything else as it is: nothing was '
                      'changed. Move that away, or choose another --out')


def _ours(name: str) -> bool:
    """A name the export writes (a part, the manifest, or ``atomic_write``'s temporary name for one)."""
    return bool(re.fullmatch(r'\.?(manifest\.json|classifier\.onnx|branch\d+\.onnx)(\.\d+\.tmp)?', name))


def _stale_staging(folder: Path) -> Optional[Path]:
    """The staging folder an export that died left in ``folder`` (only files the export writes), else ``None``.
    Called with the lock held: no live export is using it."""
    staging = folder / STAGING
    if staging.is_dir() and not staging.is_symlink() and all(p.is_file() and not p.is_symlink() and _ours(p.name)
                                                             for p in staging.iterdir()):
        return staging
    return None


def earlier_export(folder: Path) -> list[Path]:
    """The files of the earlier export in ``folder``, which ``overwrite`` may replace: its ``manifest.json``
    (first) and the ``.onnx`` files that manifest names, each with the sha256 it records.

    Raises:
        ValueError: ``folder`` holds anything else (named): no readable manifest of this format, a file or folder
            the manifest does not name, a link, or a named file whose content changed since the export.
    """
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding='utf-8')) if path.is_file() and not path.is_symlink() else None
    except (OSError, UnicodeDecodeError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        first = sorted(p.name for p in folder.iterdir() if p != _stale_staging(folder))[0]
        raise _refuse_overwrite(folder, f'holds files (e.g. {first}) but no {MANIFEST} of an earlier export')
    entries = [manifest.get('classifier'), *(manifest.get('branches') or [])]
    named = {entry.get('file'): entry.get('sha256') for entry in entries if isinstance(entry, dict)}
    named = {name: digest for name, digest in named.items() if isinstance(name, str) and Path(name).name == name}
    owned = [path]
    for entry in sorted(folder.iterdir()):
        if entry.name == MANIFEST or entry == _stale_staging(folder):
            continue
        if entry.name not in named or entry.is_symlink() or not entry.is_file():
            raise _refuse_overwrite(
                folder, f'holds {entry.name}, which the earlier export there did not write (its '
                f'{MANIFEST} does not name it)')
        if sha256_of(entry.read_bytes()) != named[entry.name]:
            raise _refuse_overwrite(
                folder, f'holds {entry.name}, whose content changed after the earlier export (its sha256 is not the '
                f'one {MANIFEST} records)')
        owned.append(entry)
    return owned


def prepare_folder(folder: Path, overwrite: bool) -> list[Path]:
    """Check ``folder`` before anything is written: new, empty, or (``overwrite``) an earlier export and nothing
    else (``earlier_export``). Returns the earlier export's files, which ``_commit`` replaces once the new export
    has passed its checks; nothing is removed here."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'--out {folder} is a file, not a folder')
    if not folder.is_dir() or not [p for p in folder.iterdir() if p != _stale_staging(folder)]:
        return []
    if not overwrite:
        raise ValueError(f'--out {folder} is not empty: choose a new folder, or pass --overwrite to replace an '
                         'earlier export there (only its manifest.json and the .onnx files it names)')
    return earlier_export(folder)


def _commit(folder: Path, staging: Path, names: list[str], earlier: list[Path]) -> None:
    """Replace the earlier export's files by the staged ones: the earlier manifest first (a folder never holds a
    manifest beside files it does not describe), its files that the new export does not write, then the new
    ``.onnx`` files, the new manifest last."""
    for path in earlier:
        if path.name == MANIFEST or path.name not in names:
            path.unlink()
    for name in names:
        os.replace(staging / name, folder / name)


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
        folder: new or empty folder (``overwrite``: an earlier export there, and nothing else, is replaced once the
            new one has passed its checks).
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
        ValueError: a bad argument, a non-empty ``folder`` (with ``overwrite``: one that holds anything but an
            earlier export, named), or a part that fails the check (named); ``folder`` is left as it was.
        FileExistsError: another export holds the lock on ``folder`` (``utils.locks.Busy``), or a file these tools
            did not write sits at ``<folder>.lock`` (``ForeignFile``).
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
    lock = RunLock(folder if folder.name not in ('', '..') else folder.resolve(), 'ONNX export', 'pick another --out')
    lock.acquire()
    try:
        earlier = prepare_folder(folder, overwrite)
        model = copy.deepcopy(net).float().cpu().eval()
        manifest = _draft_manifest(net, model, onnx, network, opset, patch, stride, command, tolerance, num_in_ch)
        return _write_export(model, onnx, folder, manifest, earlier, exact_halo)
    finally:
        lock.release()


def _draft_manifest(net: nn.Module, model: nn.Module, onnx: Any, network: Optional[dict], opset: int, patch: int,
                    stride: int, command: Optional[str], tolerance: float, num_in_ch: int) -> dict:
    """The manifest without what the writing measures (each file's sha256 and difference from PyTorch, the
    halos): everything the files record in their metadata (``part_facts``) is here before they are written.
    ``model`` is the float32 CPU copy of ``net`` in eval mode that is exported."""
    sizes = [(b, h or patch, w or patch) for b, h, w in CHECK_SIZES]
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
    unchecked = {'sha256': None, 'max_abs_diff': None}
    classifier_opt = getattr(net, 'classifier_opt', None)
    return {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'export_id': uuid.uuid4().hex,
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
            'file': CLASSIFIER_FILE, **unchecked, 'options': classifier_opt, 'output': LOGITS_OUTPUT,
            'input_convention': 'LR RGB patches in [0, 1], the engine gives it patch x patch tiles (replicated at '
            'the image border); output: logits (N, num_classes) before the softmax'
        },
        'branches': [{
            'file': branch_file(i), **unchecked, 'index': i, 'name': costs['branches'][i]['name'], 'options': opts,
            'output': SR_OUTPUT
        } for i, opts in enumerate(getattr(net, 'branch_opts', [None] * len(model.branches)))],
        'branch_order': 'cost order: branch 0 the cheapest, the last one the backbone (the largest)',
        'engine': {'patch': patch, 'stride': stride},
        'halo': None,  # measured once the files are written
        'costs': costs,
        'check': {
            'tolerance': tolerance, 'sizes': [list(s) for s in sizes], 'backend': 'onnxruntime CPUExecutionProvider'
        },
        'integrity': (f'{CHECKSUMS}: sha256 of each key\'s value as canonical JSON (sorted keys, no spaces); each '
                      '.onnx file records cdnsr.* metadata_props (role, index, scale, costs, options, export_id) '
                      'that the runtime checks against this manifest'),
    }


def _write_export(model: nn.Module, onnx: Any, folder: Path, manifest: dict, earlier: list[Path],
                  exact_halo: bool) -> dict:
    """Write and check every part in the staging folder, then move them and the manifest into ``folder``
    (replacing ``earlier``); on any failure the staging folder goes and ``folder`` is as it was."""
    draft = jsonable(manifest)
    patch, opset, num_in_ch = manifest['engine']['patch'], manifest['opset'], manifest['num_in_ch']
    sizes = [tuple(size) for size in manifest['check']['sizes']]
    parts = [(None, 'classifier', model.classifier, LOGITS_OUTPUT, manifest['classifier'])]
    parts += [(i, f'branch{i}', branch, SR_OUTPUT, manifest['branches'][i]) for i, branch in enumerate(model.branches)]
    created = not folder.exists()
    staging = folder / STAGING
    if staging.is_dir():  # left by an export that died (prepare_folder let only such a one through)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for index, name, part, output, entry in parts:
            example = torch.rand(1, num_in_ch, patch, patch, generator=torch.Generator().manual_seed(1))
            try:
                proto = onnx.load_from_string(_to_onnx(part, example, output, opset))
                props = {prop.key: prop.value for prop in proto.metadata_props}
                props.update({key: value for key, (_, value) in part_facts(draft, index).items()})
                onnx.helper.set_model_props(proto, props)
                onnx.checker.check_model(proto)
                data = proto.SerializeToString()
            except Exception as exc:  # noqa: BLE001 (the exporter and checker raise many types)
                raise ValueError(f'{name} ({type(part).__name__}) cannot be exported to ONNX at opset {opset}: '
                                 f'{type(exc).__name__}: {exc}') from exc
            atomic_write(staging / entry['file'], data)
            diff = compare_with_torch(part, data, f"{folder / entry['file']} ({name})", sizes, num_in_ch,
                                      manifest['check']['tolerance'])
            entry.update(sha256=sha256_of(data), max_abs_diff=diff)
        manifest['halo'] = _halos(model.branches, patch, exact_halo)
        manifest = jsonable(manifest)
        manifest[CHECKSUMS] = manifest_checksums(manifest)
        write_json(staging / MANIFEST, manifest)
        _commit(folder, staging, [entry['file'] for *_, entry in parts] + [MANIFEST], earlier)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return manifest
