"""ONNX export (tools/export_onnx.py, deploy/onnx_export.py) and the onnxruntime backend (deploy/onnx_runtime.py):
every part matches PyTorch, the manifest carries the engine's costs and halos, tampered files are refused, and
the tester gives the torch backend's image from the export."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network

pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

from cdnsr_plugin.deploy.onnx_export import export  # noqa: E402
from cdnsr_plugin.deploy.onnx_runtime import MANIFEST, MissingOnnx, load_exported, read_manifest  # noqa: E402
from cdnsr_plugin.inference.costs import cost_table  # noqa: E402
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine  # noqa: E402
from cdnsr_plugin.tester.cli import main as run_tester  # noqa: E402

from helpers import REPO, TESTER_LR_SIZES, TESTER_NETWORK, make_net, read_png  # noqa: E402

# x2 keeps the cost measurement short; x4 (two pixel shuffles) is in the slow test below
CARN_BRANCHES = [{'type': 'CARN', 'num_feat': f, 'upscale': 2} for f in (8, 16)]
SIZES = [(2, 32, 32), (1, 31, 45)]  # a batch of tiles, and an odd region


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def fsrcnn(setup, tmp_path_factory):
    """The tester's network (FSRCNN 16/36/56, x4) and its export."""
    _, net = setup
    folder = tmp_path_factory.mktemp('fsrcnn_onnx')
    export(net, folder, network=TESTER_NETWORK, command='pytest fsrcnn')
    return copy.deepcopy(net).eval(), folder  # the session's network is shared: not switched to eval


@pytest.fixture(scope='module')
def carn(tmp_path_factory):
    """A small CARN-branch network (grouped convolutions, pixel shuffle) and its export."""
    net = make_net(branches=CARN_BRANCHES)
    folder = tmp_path_factory.mktemp('carn_onnx')
    export(net, folder, command='pytest carn', exact_halo=False)  # its float64 radius is slow; FSRCNN's is checked
    return net, folder


@pytest.fixture(params=['fsrcnn', 'carn'])
def exported(request):
    return request.getfixturevalue(request.param)


def test_every_part_matches_pytorch_at_two_sizes_with_dynamic_axes(exported):
    net, folder = exported
    loaded = load_exported(folder)
    generator = torch.Generator().manual_seed(7)  # not the export check's inputs
    parts = [('classifier', net.classifier, loaded.classifier)]
    parts += [(f'branch{i}', b, o) for i, (b, o) in enumerate(zip(net.branches, loaded.branches))]
    for name, torch_part, onnx_part in parts:
        for batch, height, width in SIZES:
            x = torch.rand(batch, 3, height, width, generator=generator)
            with torch.no_grad():
                expected, got = torch_part(x), onnx_part(x)
            assert got.shape == expected.shape, name
            assert (got - expected).abs().max() <= 1e-4, (name, batch, height, width)
        graph = onnx.load(str(folder / f'{name}.onnx')).graph
        dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] == 'batch' and dims[2:] == ['height', 'width'], (name, dims)
    manifest = read_manifest(folder)
    assert [b['options'] for b in manifest['branches']] == net.branch_opts
    assert manifest['scale'] == net.scale and manifest['num_classes'] == len(net.branches) == net.num_classes
    assert all(entry['max_abs_diff'] <= 1e-4 for entry in [manifest['classifier'], *manifest['branches']])


def test_manifest_holds_the_torch_engines_costs_halos_and_hashes(exported):
    net, folder = exported
    manifest = read_manifest(folder)
    loaded = load_exported(folder)
    torch_engine, onnx_engine = RoutedEngine(net), RoutedEngine(loaded)
    assert onnx_engine.coefficients == torch_engine.coefficients  # exact: JSON keeps every float
    assert onnx_engine.per_pixel == torch_engine.per_pixel
    assert onnx_engine.halo == torch_engine.halo == manifest['halo']['default']
    assert loaded.cost_table(32) == cost_table(net, patch=32)
    with pytest.raises(ValueError, match='patch 32'):
        loaded.cost_table(48)
    for entry in [manifest['classifier'], *manifest['branches']]:
        assert entry['sha256'] == hashlib.sha256((folder / entry['file']).read_bytes()).hexdigest()
    assert manifest['engine'] == {'patch': 32, 'stride': 28} and manifest['command'].startswith('pytest')


def test_exact_halo_is_the_torch_networks_measured_radius(fsrcnn):
    net, folder = fsrcnn
    exact = RoutedEngine(net, EngineOptions(halo='exact')).halo
    loaded = load_exported(folder)
    assert RoutedEngine(loaded, EngineOptions(halo='exact')).halo == exact == read_manifest(folder)['halo']['exact']
    assert exact > RoutedEngine(loaded).halo  # the measured radius (8), not the default (2) again
    assert RoutedEngine(loaded, EngineOptions(halo=5)).halo == 5


@pytest.mark.parametrize('tiling', ['regions', 'paper'])
def test_the_engine_routes_an_export_as_the_torch_network(carn, lr_image, tiling):
    """Same labels, same executed regions, same image (real photo crops, one odd size)."""
    net, folder = carn
    loaded = load_exported(folder)
    options = EngineOptions(tiling=tiling, max_batch=4)
    for lr in (lr_image, lr_image[:, 5:38, 7:54]):
        ours, theirs = RoutedEngine(loaded, options), RoutedEngine(net, options)
        got, expected = ours.super_resolve(lr), theirs.super_resolve(lr)
        assert torch.equal(got.labels, expected.labels)
        assert (got.sr - expected.sr).abs().max() <= 1e-4
        if tiling == 'regions':
            assert got.plan.regions == expected.plan.regions


def tamper(folder: Path, target: Path, name: str) -> Path:
    shutil.copytree(folder, target)
    data = bytearray((target / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / name).write_bytes(bytes(data))
    return target


def test_a_tampered_or_missing_file_is_refused_by_name(fsrcnn, setup, tmp_path, capsys):
    _, folder = fsrcnn
    changed = tamper(folder, tmp_path / 'changed', 'branch1.onnx')
    with pytest.raises(ValueError, match=r'branch1\.onnx.*does not match the manifest'):
        load_exported(changed)
    root, _ = setup
    assert run_tester(['--input', str(root / 'lr'), '--onnx', str(changed), '--out', str(tmp_path / 'out')]) == 2
    assert 'branch1.onnx' in capsys.readouterr().err and not (tmp_path / 'out' / 'report.json').exists()
    (changed / 'branch1.onnx').unlink()
    with pytest.raises(FileNotFoundError, match=r'branch1\.onnx'):
        load_exported(changed)
    (changed / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match='not an export'):
        load_exported(changed)


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')  # the point of this test
def test_a_part_that_differs_from_pytorch_writes_no_manifest(tmp_path):
    """Tracing freezes Python control flow: a branch that depends on its input's width in Python exports for the
    width it was traced at, differs at the check's odd size, and the export is refused, nothing left behind (not
    even the folder it created, nor its lock)."""

    class WidthDependent(torch.nn.Module):

        def __init__(self, branch: torch.nn.Module) -> None:
            super().__init__()
            self.branch = branch

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.branch(x) * (2.0 if int(x.shape[-1]) % 2 else 1.0)

    net = make_net()
    net.branches[1] = WidthDependent(net.branches[1])
    with pytest.raises(ValueError, match=r'branch1.*differs from PyTorch'):
        export(net, tmp_path / 'bad')
    assert list(tmp_path.iterdir()) == []


def test_tester_onnxruntime_backend_gives_the_torch_backends_image(fsrcnn, setup, tmp_path):
    _, folder = fsrcnn
    root, _ = setup
    common = ['--input', root / 'lr', '--gt', root / 'hr', '--max-batch', 5]
    torch_args = ['--checkpoint', root / 'net.pth', '--network', root / 'net.yml', '--out', tmp_path / 'torch']
    assert run_tester([str(a) for a in common + torch_args]) == 0
    assert run_tester(
        [str(a) for a in common + ['--backend', 'onnxruntime', '--onnx', folder, '--out', tmp_path / 'onnx']]) == 0
    reports = {name: json.loads((tmp_path / name / 'report.json').read_text()) for name in ('torch', 'onnx')}
    assert reports['torch']['network']['backend'] == 'torch' and reports['torch']['network']['onnx'] is None
    info = reports['onnx']['network']
    assert info['backend'] == 'onnxruntime' and info['onnx']['folder'] == str(folder)
    assert info['onnx']['sha256']['classifier.onnx'] == read_manifest(folder)['classifier']['sha256']
    for key in ('halo', 'patch', 'tiling', 'costs', 'network_g'):
        assert info[key] == reports['torch']['network'][key], key
    ours = {r['image']: r for r in reports['onnx']['settings'][0]['images']}
    theirs = {r['image']: r for r in reports['torch']['settings'][0]['images']}
    assert set(ours) == set(theirs) == set(TESTER_LR_SIZES)
    for name, expected in theirs.items():
        got = ours[name]
        assert got['counts'] == expected['counts'] and got['pixel_ratio'] == expected['pixel_ratio']
        assert got['flops']['macs']['total'] == pytest.approx(expected['flops']['macs']['total'], rel=1e-12)
        if expected['psnr'] is not None:
            assert abs(got['psnr'] - expected['psnr']) <= 1e-3 and abs(got['psnr_y'] - expected['psnr_y']) <= 1e-3
        else:
            assert got['psnr'] is None
        for suffix in ('', '_classmap'):
            a = read_png(tmp_path / 'onnx' / 'lr' / f'{name}{suffix}.png').astype(int)
            b = read_png(tmp_path / 'torch' / 'lr' / f'{name}{suffix}.png').astype(int)
            assert np.abs(a - b).max() <= 1, (name, suffix)


@pytest.mark.parametrize('extra,message', [
    (['--backend', 'onnxruntime'], 'add --onnx'),
    (['--onnx', '{onnx}', '--checkpoint', '{root}/net.pth'], 'drop --checkpoint'),
    (['--onnx', '{onnx}', '--backend', 'torch'], 'drop --backend torch'),
    (['--onnx', '{onnx}', '--device', 'cuda'], 'runs on the CPU'),
    (['--onnx', '{onnx}', '--patch', '48'], 'export again with --patch 48'),
    (['--onnx', '{root}'], 'not an export'),
])
def test_tester_refuses_inconsistent_backend_options(fsrcnn, setup, tmp_path, capsys, extra, message):
    _, folder = fsrcnn
    root, _ = setup
    args = [a.format(onnx=folder, root=root) for a in extra]
    assert run_tester(['--input', str(root / 'lr'), '--out', str(tmp_path / 'out'), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_export_cli_exit_codes_and_refusal_to_overwrite(tmp_path, capsys, monkeypatch):
    tool = load_tool('export_onnx')
    network = {
        'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': 2, 'num_feat': 16},
        'branches': [{'type': 'FSRCNN', 'd': d, 's': 8, 'm': 1, 'upscale': 4} for d in (8, 12)]
    }
    torch.manual_seed(0)
    torch.save({'params': build_network(dict(network)).state_dict()}, tmp_path / 'net.pth')
    (tmp_path / 'net.yml').write_text(yaml.safe_dump({'network_g': network}))
    out = tmp_path / 'export'
    args = ['--network', str(tmp_path / 'net.yml'), '--checkpoint', str(tmp_path / 'net.pth'), '--out', str(out)]
    assert tool.main(args) == 0
    manifest = read_manifest(out)
    assert manifest['command'].startswith('export_onnx.py --network') and manifest['network_g'] == network
    first = (out / 'branch0.onnx').read_bytes()
    assert tool.main(args) == 2 and 'not empty' in capsys.readouterr().err
    # --overwrite replaces only an earlier export (tests/deploy/test_onnx_manifest.py: what else it refuses)
    assert tool.main(args + ['--overwrite', '--opset', '13', '--no-exact-halo']) == 0
    assert read_manifest(out)['opset'] == 13
    assert read_manifest(out)['halo']['exact'] is None and read_manifest(out)['halo']['default'] == 2
    with pytest.raises(ValueError, match='no exact halo'):
        RoutedEngine(load_exported(out), EngineOptions(halo='exact')).halo
    assert (out / 'branch0.onnx').read_bytes() != first
    assert sorted(p.name for p in out.iterdir()) == ['branch0.onnx', 'branch1.onnx', 'classifier.onnx', MANIFEST]
    assert tool.main(args[:1] + [str(tmp_path / 'missing.yml')] + args[2:]) == 2
    assert 'missing.yml' in capsys.readouterr().err
    assert tool.main(args + ['--overwrite', '--opset', '9']) == 2 and 'opset' in capsys.readouterr().err
    assert tool.main(args[:3] + [str(tmp_path / 'net.yml')] + args[4:] + ['--overwrite']) == 2  # a YAML, not weights
    monkeypatch.setitem(sys.modules, 'onnx', None)  # as if the extra were not installed
    assert tool.main(args[:-1] + [str(tmp_path / 'none')]) == 2
    assert "pip install '.[onnx]'" in capsys.readouterr().err and not (tmp_path / 'none').exists()
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    with pytest.raises(MissingOnnx, match='onnx'):
        load_exported(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    'branches', [
        [{'type': 'CARN', 'num_feat': f, 'upscale': 4} for f in (8, 16)],
        [{'type': 'MSRResNet', 'num_feat': f, 'num_block': 2, 'upscale': 3} for f in (8, 16)],
    ],
    ids=['CARN-x4', 'MSRResNet-x3'])
def test_pixel_shuffle_and_resize_networks_export_at_every_scale(branches, tmp_path):
    """Two pixel shuffles (CARN x4), BasicSR's MSRResNet (pixel shuffle and a bilinear resize, x3)."""
    net = make_net(branches=branches)
    manifest = export(net, tmp_path)
    loaded = load_exported(tmp_path)
    x = torch.rand(1, 3, 19, 27, generator=torch.Generator().manual_seed(3))
    for torch_branch, onnx_branch in zip(net.branches, loaded.branches):
        with torch.no_grad():
            expected = torch_branch(x)
        assert expected.shape[-2:] == (19 * net.scale, 27 * net.scale)
        assert (onnx_branch(x) - expected).abs().max() <= 1e-4
    assert manifest['halo']['default'] == RoutedEngine(net).halo
