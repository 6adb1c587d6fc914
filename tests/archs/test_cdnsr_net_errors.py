"""Bad container options raise one ValueError that names the offending key."""
import pytest
import yaml
from basicsr.archs import build_network

OK_CLASSIFIER = '{type: PatchClassifier, num_classes: 3}'


def build(text: str):
    return build_network(yaml.safe_load(text))


@pytest.mark.parametrize('text,key', [
    (f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\nbranches: [{{type: FSRCNN, d: 16}}, {{type: FSRCNN, d: 56}}]',
     'classifier.num_classes'),
    (f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\n'
     'branches: [{type: FSRCNN, d: 16}, {type: NoSuchNet}, {type: FSRCNN, d: 56}]', 'branches[1].type'),
    (f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\nbranches: [{{type: FSRCNN}}, {{d: 36}}, {{type: FSRCNN}}]',
     "branches[1] has no 'type'"),
    ('type: CDNSRNet\nclassifier: {num_classes: 3}\nbranches: [{type: FSRCNN}, {type: FSRCNN}, {type: FSRCNN}]',
     "classifier has no 'type'"),
    (f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\n'
     'branches: [{type: FSRCNN, upscale: 4}, {type: FSRCNN, upscale: 4}, {type: FSRCNN, upscale: 2}]', 'branches[2]'),
    (f'type: CDNSRNet\nscale: 2\nclassifier: {OK_CLASSIFIER}\n'
     'branches: [{type: FSRCNN}, {type: FSRCNN}, {type: FSRCNN}]', 'scale'),
    (f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\nbranches: [{{type: FSRCNN, bogus: 1}}, {{type: FSRCNN}}, '
     '{type: FSRCNN}]', 'branches[0]'),
    (f'type: CDNSRNet\nrouting: argmax\nclassifier: {OK_CLASSIFIER}\nbranches: [{{type: FSRCNN}}, {{type: FSRCNN}}]',
     'routing'),
])
def test_bad_options_name_the_key(text, key):
    with pytest.raises(ValueError) as info:
        build(text)
    assert key in str(info.value)


def test_scale_mismatch_message_says_both_scales():
    text = (f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\n'
            'branches: [{type: FSRCNN, upscale: 4}, {type: CARN, upscale: 3}, {type: FSRCNN, upscale: 4}]')
    with pytest.raises(ValueError, match=r'branches\[1\] upscales x3 but branches\[0\] upscales x4'):
        build(text)


def test_unknown_classifier_type_is_named():
    with pytest.raises(ValueError, match=r"classifier\.type: no arch named 'Nope'"):
        build('type: CDNSRNet\nclassifier: {type: Nope}\nbranches: [{type: FSRCNN}, {type: FSRCNN}]')


def test_mismatched_m_says_how_many():
    with pytest.raises(ValueError, match='branches has 2 entries but classifier.num_classes is 3'):
        build(f'type: CDNSRNet\nclassifier: {OK_CLASSIFIER}\nbranches: [{{type: FSRCNN}}, {{type: FSRCNN}}]')
