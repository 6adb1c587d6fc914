"""Issue 25: what an ONNX export's manifest claims is checked against the files (deploy/onnx_runtime.py), and
tools/export_onnx.py treats its --out as an output (deploy/onnx_export.py): a lock, --overwrite only over an
earlier export of its own, files moved into place only once every part passed its check.

The manifest has its own checksum (``manifest_sha256``: an edit names the key); a manifest edited and then
resealed (what a careful hand edit, or files copied from another export, give) is caught by the files' ONNX
metadata (role, branch index, scale, costs, export id) and by a probe of the graphs. Each refusal is checked
through the tester (exit 2, one line naming the manifest and the key, before any image; a subprocess where the
exit status is the point), with the user's files unchanged by sha256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import pytest
import torch
import yaml
from basicsr.archs import build_network

pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

from cdnsr_plugin.deploy import onnx_export, onnx_runtime  # noqa: E402
from cdnsr_plugin.deploy.onnx_export import STAGING, export  # noqa: E402
from cdnsr_plugin.deploy.onnx_runtime import MANIFEST, load_exported, manifest_checksums, read_manifest  # noqa: E402
from cdnsr_plugin.tester.cli import main as run_tester  # noqa: E402
from cdnsr_plugin.utils.locks import RunLock, lock_path  # noqa: E402

from helpers import REPO, run  # noqa: E402

CHECKSUMS = onnx_runtime.CHECKSUMS
NETWORK = {
    'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': 3, 'num_feat': 16},
    'branches': [{'type': 'FSRCNN', 'd': d, 's': 8, 'm': 1, 'upscale': 4} for d in (8, 12, 16)]
}


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob('*')) if p.is_file()
    }


def network(network_opt: dict = NETWORK) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(dict(network_opt)).eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory, photos):
    """A three-branch FSRCNN x4 export and a folder with one 64x96 LR crop of a real photo."""
    root = tmp_path_factory.mktemp('manifest')
    export(network(), root / 'export', network=NETWORK, command='pytest', exact_halo=False)
    (root / 'lr').mkdir()
    photo = photos[1]
    cv2.imwrite(str(root / 'lr' / 'coffee.png'), photo[100:164, 200:296])
    return root / 'export', root / 'lr'


@pytest.fixture
def copy(exported, tmp_path):
    """A copy of the export to edit."""
    folder, _ = exported
    return Path(shutil.copytree(folder, tmp_path / 'ox'))


def edit(folder: Path, change, reseal: bool = False) -> None:
    """Change ``folder``'s manifest as a user would by hand (``reseal``: and recompute its checksum)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    if reseal:
        manifest[CHECKSUMS] = manifest_checksums(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def set_metadata(folder: Path, name: str, **values: str) -> None:
    """Rewrite ``cdnsr.<key>`` metadata of ``folder/name`` (``None`` drops every ``cdnsr.*`` key), then the
    manifest's sha256 of it and its checksum: an export that is consistent but for the metadata."""
    model = onnx.load(str(folder / name))
    props = {p.key: p.value for p in model.metadata_props}
    if values.get('drop'):
        props = {k: v for k, v in props.items() if not k.startswith('cdnsr.')}
    props.update({f'cdnsr.{key}': value for key, value in values.items() if key != 'drop'})
    onnx.helper.set_model_props(model, props)
    data = model.SerializeToString()
    (folder / name).write_bytes(data)

    def rehash(manifest: dict) -> None:
        for entry in [manifest['classifier'], *manifest['branches']]:
            if entry['file'] == name:
                entry['sha256'] = hashlib.sha256(data).hexdigest()

    edit(folder, rehash, reseal=True)


def swap_branches(manifest: dict) -> None:
    """The issue's edit: branch0 and branch2 entries' file and sha256 exchanged."""
    first, last = manifest['branches'][0], manifest['branches'][2]
    for key in ('file', 'sha256'):
        first[key], last[key] = last[key], first[key]


def refused_by_the_tester(export_folder: Path, lr: Path, out: Path, capsys, message: str) -> str:
    """The tester (in process) exits 2 with one line naming the manifest and ``message``, before any image."""
    before = hashes(lr), hashes(export_folder)
    assert run_tester(['--input', str(lr), '--onnx', str(export_folder), '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err, err
    assert (hashes(lr), hashes(export_folder)) == before
    assert not out.exists() or not [p for p in out.rglob('*') if p.is_file()]
    assert not lock_path(out).exists()
    return err


# ----------------------------------------------------------------------------- the manifest's own checksum


def test_an_edited_scale_is_refused_before_any_image_in_a_subprocess(exported, copy, tmp_path):
    """The issue's case: "scale": 2 gave a 128x192 zoomed quarter (10.7 dB) and exit 0; now exit 2, one line."""
    _, lr = exported
    edit(copy, lambda m: m.update(scale=2))
    before = hashes(lr), hashes(copy)
    result = run([
        str(REPO / 'tools' / 'test_patches.py'), '--input', lr, '--onnx', copy, '--out', tmp_path / 'out', '--threads',
        '1'
    ],
                 cwd=REPO,
                 check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert 'Traceback' not in result.stderr and len(lines) == 1, result.stderr
    assert str(copy / MANIFEST) in lines[0] and "'scale' was changed after the export" in lines[0]
    assert (hashes(lr), hashes(copy)) == before and not (tmp_path / 'out').exists()


@pytest.mark.parametrize(
    'change,message', [
        (lambda m: m.update(scale=8), "'scale' was changed"),
        (swap_branches, "'branches' was changed"),
        (lambda m: m['costs']['branches'][0].update(macs=1), "'costs' was changed"),
        (lambda m: m['halo'].update(default=0), "'halo' was changed"),
        (lambda m: m.update(note='mine'), "'note' was added"),
        (lambda m: m.pop('engine'), "'engine' was removed"),
        (lambda m: m.pop(CHECKSUMS), f"has no '{CHECKSUMS}'"),
        (lambda m: m.update(format_version=1), 'format_version 1; this plugin reads version 2'),
    ],
    ids=['scale-8', 'swapped-branches', 'costs', 'halo', 'added-key', 'removed-key', 'no-checksum', 'version-1'])
def test_a_hand_edited_manifest_is_refused_naming_the_key(exported, copy, tmp_path, capsys, change, message):
    _, lr = exported
    edit(copy, change)
    with pytest.raises(ValueError, match='export again'):
        read_manifest(copy)
    err = refused_by_the_tester(copy, lr, tmp_path / 'out', capsys, message)
    assert str(copy / MANIFEST) in err


# ----------------------------------------------------------------------------- the files' metadata and graphs


@pytest.mark.parametrize(
    'change,message', [
        (lambda m: m.update(scale=2), 'scale says 2 but classifier.onnx was exported with 4'),
        (swap_branches, 'branches[0] names branch2.onnx, which was exported as branch 2 (its ONNX metadata '
         'cdnsr.index): the branch order was changed'),
        (lambda m: m['costs']['branches'].reverse(), 'costs.branches[0] says {"macs":'),
        (lambda m: m['costs']['full_image_coefficients'][1]['macs'].__setitem__(0, 1.0),
         'costs.full_image_coefficients[1] says'),
        (lambda m: m['branches'][1]['options'].update(d=64), 'branches[1].options says'),
        (lambda m: m.update(export_id='0' * 32), 'export_id says "000'),
    ],
    ids=['scale', 'swapped-branches', 'swapped-costs', 'coefficients', 'options', 'export-id'])
def test_a_resealed_manifest_must_agree_with_each_files_metadata(exported, copy, tmp_path, capsys, change, message):
    """A manifest edited and given a new checksum: the files' own metadata refuse it (the FLOPs the engine plans
    and reports, the branch each class runs, the scale)."""
    _, lr = exported
    edit(copy, change, reseal=True)
    read_manifest(copy)  # the checksum agrees
    with pytest.raises(ValueError, match='export again with tools/export_onnx.py'):
        load_exported(copy)
    refused_by_the_tester(copy, lr, tmp_path / 'out', capsys, message)


def test_files_of_another_export_or_without_metadata_are_refused(copy):
    set_metadata(copy, 'branch1.onnx', export_id=json.dumps('f' * 32))
    with pytest.raises(ValueError, match=r'export_id says "\w+" but branch1\.onnx was exported with "fff'):
        load_exported(copy)
    set_metadata(copy, 'classifier.onnx', drop=True)  # an ONNX file of other origin, named and hashed by hand
    with pytest.raises(ValueError, match=r'classifier\.onnx has no cdnsr\.\* metadata .* export again'):
        load_exported(copy)


def test_the_scale_is_checked_on_the_graphs_output(copy):
    """Every file and the manifest say x2 (consistent metadata, checksums and hashes): the graphs still give x4,
    and the probe refuses it."""
    for name in ('classifier.onnx', 'branch0.onnx', 'branch1.onnx', 'branch2.onnx'):
        set_metadata(copy, name, scale='2')
    edit(copy, lambda m: m.update(scale=2), reseal=True)
    with pytest.raises(ValueError) as error:
        load_exported(copy)
    assert str(error.value).startswith(f"{copy / MANIFEST}: 'scale' says x2 with 3 channels but branch0.onnx turns "
                                       'a 1x3x8x12 probe into 1x3x32x48, not 1x3x16x24')


# ----------------------------------------------------------------------------- tools/export_onnx.py --out


@pytest.fixture
def tool_args(tmp_path):
    torch.save({'params': network().state_dict()}, tmp_path / 'net.pth')
    (tmp_path / 'net.yml').write_text(yaml.safe_dump({'network_g': NETWORK}))
    return ['--network', str(tmp_path / 'net.yml'), '--checkpoint', str(tmp_path / 'net.pth'), '--no-exact-halo']


def test_overwrite_refuses_a_folder_holding_files_it_did_not_write(exported, tmp_path, tool_args, capsys):
    folder, _ = exported
    out = Path(shutil.copytree(folder, tmp_path / 'out'))
    (out / 'notes.txt').write_text('mine')
    before = hashes(out)
    result = run([str(REPO / 'tools' / 'export_onnx.py'), *tool_args, '--out', out, '--overwrite'], REPO, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert 'holds notes.txt, which the earlier export there did not write' in result.stderr
    assert 'nothing was changed' in result.stderr and result.stderr.count('\n') == 1
    assert hashes(out) == before and not lock_path(out).exists()

    tool = load_tool('export_onnx')
    (out / 'notes.txt').unlink()
    (out / 'branch1.onnx').write_bytes(b'my own model')  # a file the manifest names, replaced by the user
    before = hashes(out)
    assert tool.main([*tool_args, '--out', str(out), '--overwrite']) == 2
    assert 'holds branch1.onnx, whose content changed after the earlier export' in capsys.readouterr().err
    assert hashes(out) == before
    (out / 'branch1.onnx').write_bytes((folder / 'branch1.onnx').read_bytes())
    (out / 'keep').mkdir()
    (out / 'keep' / 'a.txt').write_text('mine')
    before = hashes(out)
    assert tool.main([*tool_args, '--out', str(out), '--overwrite']) == 2
    assert 'holds keep, which the earlier export there did not write' in capsys.readouterr().err
    assert hashes(out) == before
    shutil.rmtree(out / 'keep')

    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'photo.png').write_bytes(b'not an export')
    assert tool.main([*tool_args, '--out', str(mine), '--overwrite']) == 2
    assert 'holds files (e.g. photo.png) but no manifest.json' in capsys.readouterr().err
    assert hashes(mine) == {'photo.png': hashlib.sha256(b'not an export').hexdigest()}

    # an earlier export of its own (three branches) is replaced, all of it, by a two-branch one
    two = dict(NETWORK, classifier=dict(NETWORK['classifier'], num_classes=2), branches=NETWORK['branches'][:2])
    torch.save({'params': network(two).state_dict()}, tmp_path / 'two.pth')
    (tmp_path / 'two.yml').write_text(yaml.safe_dump({'network_g': two}))
    args = ['--network', str(tmp_path / 'two.yml'), '--checkpoint', str(tmp_path / 'two.pth'), '--no-exact-halo']
    assert tool.main([*args, '--out', str(out), '--overwrite']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['branch0.onnx', 'branch1.onnx', 'classifier.onnx', MANIFEST]
    assert load_exported(out).num_classes == 2 and not lock_path(out).exists()


def test_a_failed_overwrite_leaves_the_earlier_export_as_it_was(exported, tmp_path, monkeypatch):
    folder, _ = exported
    out = Path(shutil.copytree(folder, tmp_path / 'out'))
    before = hashes(out)
    checked = onnx_export.compare_with_torch

    def fail_on_branch1(part, data, name, *args, **kwargs):
        if 'branch1' in name:
            raise ValueError(f'{name}: onnxruntime differs from PyTorch (as if)')
        return checked(part, data, name, *args, **kwargs)

    monkeypatch.setattr(onnx_export, 'compare_with_torch', fail_on_branch1)
    with pytest.raises(ValueError, match='as if'):
        export(network(), out, network=NETWORK, overwrite=True, exact_halo=False)
    assert hashes(out) == before and not lock_path(out).exists()  # no staging folder left either
    load_exported(out)


def test_a_second_export_into_the_same_out_fails_at_once(tmp_path, tool_args):
    out = tmp_path / 'out'
    lock = RunLock(out, 'ONNX export', 'pick another --out').acquire(log=lambda _: None)  # as a running export
    try:
        result = run([str(REPO / 'tools' / 'export_onnx.py'), *tool_args, '--out', out], REPO, check=False)
    finally:
        lock.release()
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert f'another run is writing the ONNX export {out}' in result.stderr and 'pick another --out' in result.stderr
    assert not out.exists()


def test_an_export_that_died_leaves_a_staging_folder_the_next_one_removes(exported, tmp_path):
    folder, _ = exported
    out = tmp_path / 'out'
    (out / STAGING).mkdir(parents=True)
    (out / STAGING / 'branch0.onnx').write_bytes(b'half written')  # a SIGKILL while writing
    (out / STAGING / '.branch1.onnx.123.tmp').write_bytes(b'half')
    export(network(), out, network=NETWORK, exact_halo=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    (out / STAGING).mkdir()
    (out / STAGING / 'notes.txt').write_text('mine')  # not a staging folder of the export: not touched
    with pytest.raises(ValueError, match=f'holds {STAGING}, which the earlier export there did not write'):
        export(network(), out, network=NETWORK, overwrite=True, exact_halo=False)
    assert (out / STAGING / 'notes.txt').read_text() == 'mine'
