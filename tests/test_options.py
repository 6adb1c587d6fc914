"""The shipped option files: each parses with the safe loader and builds its network, and every file that
defines a routed network of a backbone defines the one in ``options/networks/``."""
import pytest
from basicsr.archs import build_network
from basicsr.data import build_dataset

from cdnsr_plugin.utils.options import load_options

from helpers import REPO

OPTIONS = REPO / 'options'
FILES = sorted(path.relative_to(OPTIONS).as_posix() for path in OPTIONS.rglob('*.yml'))
BACKBONES = ('CARN', 'FSRCNN', 'RCAN', 'SRResNet')


def network_of(relative: str) -> dict:
    return load_options(OPTIONS / relative)['network_g']


def test_the_layout_users_type():
    """Training files where the README's commands expect them; the rest in subfolders."""
    top = {name for name in FILES if '/' not in name}
    assert 'train_CDNSR_RCAN.yml' in top and all(name.startswith('train_') for name in top)
    assert {name.split('/')[0] for name in FILES if '/' in name} == {'demo', 'networks', 'reference', 'test'}
    folders = [name.split('/')[0] for name in FILES if '/' in name]
    assert (len(top), folders.count('networks'), folders.count('test')) == (12, 4, 8)  # 4 backbones
    # the training file of every shipped model (a model whose branches come from another names that one), and the
    # static network of the equal-cost frontier
    from cdnsr_plugin import weights
    shipped = {weights.manifest(name)['training']['options'].removeprefix('options/') for name in weights.names()}
    expected = shipped | {'reference/train_static_carn52_x4.yml'}
    assert {name for name in FILES if name.startswith('reference/')} == expected


@pytest.mark.parametrize('relative', FILES)
def test_every_option_file_parses_and_builds_its_network(relative):
    opt = load_options(OPTIONS / relative)
    assert isinstance(opt.get('name'), str) and opt.get('scale') == 4
    net = build_network(dict(opt['network_g']))
    assert sum(p.numel() for p in net.parameters()) > 0
    if opt['network_g']['type'] == 'CDNSRNet':
        assert net.scale == 4 and net.num_classes == len(opt['network_g']['branches'])


@pytest.mark.parametrize('backbone', BACKBONES)
def test_routed_networks_agree_with_options_networks(backbone):
    reference = network_of(f'networks/CDNSR_{backbone}_x4.yml')
    users = [
        f'train_CDNSR_{backbone}.yml', f'train_ClassSR_{backbone}.yml', f'test/test_CDNSR_{backbone}.yml',
        f'test/test_ClassSR_{backbone}.yml'
    ]
    for relative in users:
        network = network_of(relative)
        assert network['classifier'] == reference['classifier'], relative
        assert network['branches'] == reference['branches'], relative
    # the single-backbone "-O" baseline is the largest branch
    single = network_of(f'train_{backbone}.yml')
    assert single == reference['branches'][-1]


def test_demo_networks_agree_with_each_other():
    cdnsr, classsr = network_of('demo/train_CDNSR_FSRCNN_demo.yml'), network_of('demo/train_ClassSR_FSRCNN_demo.yml')
    assert cdnsr['branches'] == classsr['branches'] and cdnsr['classifier'] == classsr['classifier']
    assert network_of('demo/train_FSRCNN_demo.yml') == cdnsr['branches'][-1]


@pytest.mark.parametrize('source,classes', [('train_CDNSR_FSRCNN.yml', None), ('train_CDNSR_FSRCNN.yml', [0]),
                                            ('train_FSRCNN.yml', None)])
def test_training_datasets_build_on_a_prepared_set(training_data, source, classes):
    """The ``datasets.train`` sections as shipped (the plugin's DifficultyPairedDataset, one class of it as the
    README suggests for pre-training the smallest branch, BasicSR's own PairedImageDataset over the same
    LMDBs), pointed at a real prepared set."""
    from cdnsr_plugin.data.prepared_set import PreparedSet
    prepared = PreparedSet(training_data[0])
    opt = dict(
        load_options(OPTIONS / source)['datasets']['train'],
        phase='train',
        scale=4,
        dataroot_gt=str(prepared.gt_path),
        dataroot_lq=str(prepared.lq_path))
    if classes is not None:
        opt['classes'] = classes
    dataset = build_dataset(opt)
    expected = prepared.summary['classes'][0]['count'] if classes == [0] else prepared.summary['num_pairs']
    assert len(dataset) == expected
    assert dataset[0]['gt'].shape == (3, 128, 128)
