"""Run a routed network exported by ``tools/export_onnx.py`` (``deploy.onnx_export``) with onnxruntime on the CPU.

``load_exported(folder)`` returns an ``ExportedNet``: a ``torch.nn.Module`` with the interface that the one
routed executor (``inference.engine.RoutedEngine``) uses of a ``CDNSRNet`` -- ``classifier`` and ``branches``
(modules whose ``forward`` runs an onnxruntime session on numpy arrays), ``classify``, ``route``, ``scale``,
``num_classes`` -- so the engine, its regions, the cost knob and the tester run unchanged. What the engine
measures on torch modules (each branch's cost coefficients with ptflops, the halo with a float64 copy) cannot
be measured on an ONNX file; the export measured them on the torch network and the manifest carries them:
``cost_coefficients`` and ``resolve_halo`` (the engine asks for them when a network has them), and
``cost_table`` (the tester's per-tile costs).

Nothing the manifest claims is taken on trust (``load_exported`` refuses, with a ``ValueError`` naming the
manifest file and the key, before any image is processed):

* the manifest's own checksum: ``manifest_sha256`` holds the sha256 of each top-level key's value as canonical
  JSON (``canonical_json``: sorted keys, no spaces); a key changed, added or removed after the export is named
  (``read_manifest``, which the tester calls first);
* each file's sha256 against the manifest (the bytes that are hashed are the bytes that are loaded);
* each file's ONNX metadata (``metadata_props``, keys ``cdnsr.*``, written at export: ``part_facts``) against
  the manifest's entry at that position: the role (classifier or branch), the branch index (the branch order),
  the scale, the number of classes and channels, the part's per-tile costs and whole-image cost coefficients,
  its options, and the ``export_id`` shared by the files of one export (files of two exports do not mix);
* the graphs themselves on a tiny probe: each branch turns a 1 x C x 8 x 12 input into 1 x C' x 8 s x 12 s
  (``s`` the manifest's scale), the classifier a patch into ``num_classes`` logits, all finite.

Exports of format version 1 (no checksum, no metadata) are refused with a message to export again: they cannot
be checked, and exporting again is one command. Only ``manifest.json`` and the ``.onnx`` files it names are
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
FORMAT_VERSION = 2  # 2: manifest_sha256 and the cdnsr.* metadata of every file
MANIFEST = 'manifest.json'
CHECKSUMS = 'manifest_sha256'  # the manifest's own checksum: {key: sha256 of canonical_json(value)}
METADATA_PREFIX = 'cdnsr.'  # the keys an export writes into each file's metadata_props
PROBE_SIZE = (8, 12)  # (height, width) of the input each branch runs on at load, to check the scale
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


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces: the same text for the same content, however the file
    is indented (what ``manifest_sha256`` and the files' metadata hash and compare)."""
    return json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=True, allow_nan=False)


def manifest_checksums(manifest: dict) -> dict[str, str]:
    """The manifest's own checksum: sha256 of ``canonical_json`` of each top-level value, every key but
    ``manifest_sha256`` itself (the export stores it there; ``read_manifest`` recomputes and compares it)."""
    return {
        key: sha256_of(canonical_json(value).encode('utf-8'))
        for key, value in manifest.items() if key != CHECKSUMS
    }


def part_facts(manifest: dict, index: Optional[int]) -> dict[str, tuple[str, str]]:
    """What the ONNX file at a position of ``manifest`` records about itself in its metadata: ``{metadata key:
    (the manifest key it must agree with, the value as canonical JSON)}``; ``index`` ``None`` is the classifier,
    else the branch at that position. The export writes these values; ``load_exported`` compares them.

    Raises:
        KeyError, IndexError, TypeError: ``manifest`` lacks a field (the caller names the manifest).
    """
    costs = manifest['costs']
    facts: dict[str, tuple[str, Any]] = {
        'format': ('format', FORMAT),
        'role': ('classifier' if index is None else f'branches[{index}]', 'classifier' if index is None else 'branch'),
    }
    if index is not None:
        facts['index'] = (f'branches[{index}]', index)
    facts.update({
        'export_id': ('export_id', manifest['export_id']),
        'scale': ('scale', manifest['scale']),
        'num_classes': ('num_classes', manifest['num_classes']),
        'num_in_ch': ('num_in_ch', manifest['num_in_ch']),
        'cost_patch': ('costs.patch', costs['patch']),
    })
    if index is None:
        facts.update({
            'cost': ('costs.classifier', costs['classifier']),
            'options': ('classifier.options', manifest['classifier']['options']),
        })
    else:
        facts.update({
            'num_out_ch': ('num_out_ch', manifest['num_out_ch']),
            'cost': (f'costs.branches[{index}]', costs['branches'][index]),
            'full_image_coefficients': (f'costs.full_image_coefficients[{index}]',
                                        costs['full_image_coefficients'][index]),
            'options': (f'branches[{index}].options', manifest['branches'][index]['options']),
        })
    return {METADATA_PREFIX + name: (key, canonical_json(value)) for name, (key, value) in facts.items()}


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or ``MissingOnnx`` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingOnnx(f'running an exported network needs onnxruntime, an optional dependency ({exc}): '
                          f'{INSTALL_HINT}') from None
    return onnxruntime


def read_manifest(folder: Path | str) -> dict:
    """``folder/manifest.json``, checked to be this format and version, to agree with its own checksum
    (``manifest_sha256``) and to have the fields the runtime reads. The files are checked by ``load_exported``.

    Raises:
        FileNotFoundError: no folder or no manifest (not an export, or an export that failed its check).
        ValueError: another format or version (version 1: export again), a key changed, added or removed after
            the export (named), or a missing field (named).
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
                         f'version {FORMAT_VERSION} (an export it can check: a checksum of the manifest and metadata '
                         'in every file): export again with this version of tools/export_onnx.py')
    _check_checksums(path, manifest)
    for key in ('scale', 'num_classes', 'network_g', 'classifier', 'branches', 'costs', 'halo', 'engine'):
        if key not in manifest:
            raise ValueError(f'{path} has no {key!r}; export again with tools/export_onnx.py')
    if len(manifest['branches']) != manifest['num_classes']:
        raise ValueError(f"{path}: {len(manifest['branches'])} branches for {manifest['num_classes']} classes")
    return manifest


def _check_checksums(path: Path, manifest: dict) -> None:
    """``manifest_sha256`` must list every key with the sha256 of its content (``manifest_checksums``)."""
    stored = manifest.get(CHECKSUMS)
    if not isinstance(stored, dict) or not all(isinstance(value, str) for value in stored.values()):
        raise ValueError(f'{path} has no {CHECKSUMS!r} (the checksum of its own content) or it was edited: this '
                         'manifest cannot be checked; export again with tools/export_onnx.py')
    try:
        actual = manifest_checksums(manifest)
    except ValueError:  # NaN or inf: the export never writes them
        raise ValueError(f'{path} holds NaN or Infinity, which the export never writes: it was edited; export again '
                         'with tools/export_onnx.py') from None
    for key in [*stored, *(key for key in actual if key not in stored)]:
        if key not in actual:
            problem = 'was removed after the export'
        elif key not in stored:
            problem = 'was added after the export'
        elif stored[key] != actual[key]:
            problem = 'was changed after the export'
        else:
            continue
        raise ValueError(f'{path}: {key!r} {problem} (its content does not match {CHECKSUMS!r}, the checksum the '
                         'export wrote); the manifest must stay as tools/export_onnx.py wrote it: export again '
                         '(or restore the file)')


def _shown(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _check_metadata(folder: Path, file: str, metadata: dict[str, str], facts: dict[str, tuple[str, str]]) -> None:
    """The ``cdnsr.*`` metadata of ``file`` must be ``facts`` (``part_facts`` of its manifest position)."""
    manifest = folder / MANIFEST
    if not any(key.startswith(METADATA_PREFIX) for key in metadata):
        raise ValueError(f'{folder / file} has no {METADATA_PREFIX}* metadata (its role, index, scale and costs, '
                         f'which {manifest} is checked against): it was not written by this version of '
                         'tools/export_onnx.py; export again')
    for meta_key, (manifest_key, expected) in facts.items():
        got = metadata.get(meta_key)
        if got is None:
            raise ValueError(f'{folder / file} lacks the ONNX metadata {meta_key} that {manifest} ({manifest_key}) '
                             'is checked against: export again with tools/export_onnx.py')
        if got != expected and meta_key == f'{METADATA_PREFIX}index':
            raise ValueError(f'{manifest}: {manifest_key} names {file}, which was exported as branch {got} '
                             f'(its ONNX metadata {meta_key}): the branch order was changed, so each class would run '
                             'another branch and its FLOPs be misreported; export again with tools/export_onnx.py')
        if got != expected:
            raise ValueError(f'{manifest}: {manifest_key} says {_shown(expected)} but {file} was exported with '
                             f'{_shown(got)} (its ONNX metadata {meta_key}): the manifest was edited or the file '
                             'comes from another export; export again with tools/export_onnx.py')


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
        ValueError: the manifest disagrees with its checksum, a file's sha256, a file's metadata or what a file
            computes on the probe (the manifest, the key and the file are named; see the module docstring),
            another format or version, or onnxruntime is missing (``MissingOnnx``).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    entries = {'classifier': manifest['classifier'], **{f'branch{i}': e for i, e in enumerate(manifest['branches'])}}
    data = {name: _checked_bytes(folder, entry, name) for name, entry in entries.items()}
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

    sessions = {name: session(name) for name in data}
    for name in sessions:
        try:
            facts = part_facts(manifest, None if name == 'classifier' else int(name[len('branch'):]))
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f'{folder / MANIFEST} lacks a field the files are checked against ({type(exc).__name__}: '
                             f'{exc}); export again with tools/export_onnx.py') from None
        metadata = dict(sessions[name].get_modelmeta().custom_metadata_map)
        _check_metadata(folder, entries[name]['file'], metadata, facts)
    scale, channels = int(manifest['scale']), int(manifest.get('num_out_ch', 3))
    classifier = OnnxPart(sessions['classifier'], CLASSIFIER_FILE, (int(manifest['num_classes']), ))
    branches = [
        OnnxPart(sessions[f'branch{i}'], branch_file(i), (channels, scale, scale))
        for i in range(len(manifest['branches']))
    ]
    _probe(folder, manifest, entries, classifier, branches)
    return ExportedNet(folder, manifest, classifier, branches).eval()


def _probe(folder: Path, manifest: dict, entries: dict[str, dict], classifier: OnnxPart,
           branches: list[OnnxPart]) -> None:
    """Each graph on a tiny input: the classifier gives ``num_classes`` logits for a patch, each branch upscales
    by the manifest's scale to its ``num_out_ch`` channels, all finite (what the metadata says, seen in the
    graph itself)."""
    channels_in, scale = int(manifest.get('num_in_ch', 3)), int(manifest['scale'])
    patch = int(manifest['costs']['patch'])
    height, width = PROBE_SIZE
    checks = [('classifier', classifier, (1, channels_in, patch, patch), (1, int(manifest['num_classes'])),
               'num_classes')]
    sr_shape = (1, int(manifest.get('num_out_ch', 3)), height * scale, width * scale)
    checks += [(f'branch{i}', branch, (1, channels_in, height, width), sr_shape, 'scale')
               for i, branch in enumerate(branches)]
    for name, part, shape, expected, key in checks:
        file, probe = entries[name]['file'], 'x'.join(map(str, shape))
        try:
            with torch.no_grad():
                out = part(torch.full(shape, 0.5))
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own exception types)
            raise ValueError(f"onnxruntime cannot run {folder / file} on a {probe} probe "
                             f"({' '.join(str(exc).split())[:200]}); export again with tools/export_onnx.py") from None
        got = tuple(out.shape)
        if got != expected:
            what = (f'{manifest[key]} classes' if key == 'num_classes' else f'x{scale} with {expected[1]} channels')
            raise ValueError(f"{folder / MANIFEST}: {key!r} says {what} but {file} turns a {probe} probe into "
                             f"{'x'.join(map(str, got))}, not {'x'.join(map(str, expected))}: the manifest does not "
                             'describe this file; export again with tools/export_onnx.py')
        if not torch.isfinite(out).all():
            raise ValueError(f'{folder / file} gives non-finite values (NaN or inf) on a {probe} probe of 0.5: '
                             'export again from finite weights')
