"""tools/reproduce_cpu.py: recipes cut into training runs that share what they have in common, and never a
checkpoint trained from other options."""
import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / 'tools'))
import reproduce_cpu  # noqa: E402


def segment_options(segment: reproduce_cpu.Segment) -> str:
    """What a segment trains: its stages of its option file and its start, as JSON."""
    stages = [segment.opt['train']['stages'][i] for i in segment.stages] if segment.opt['train'].get('stages') else []
    return json.dumps([segment.opt['network_g'], stages, segment.after, segment.parts, segment.optim], sort_keys=True)


def test_a_shared_segment_is_the_same_training_in_every_recipe_that_names_it():
    """The CDNSR variants share their pruned branches, the ClassSR ablations ClassSR's branches: a name must always
    mean the same run, or an ablation would silently start from another recipe's weights."""
    found = {**reproduce_cpu.recipes(0.5), **reproduce_cpu.ablations(0.5)}
    by_name = {}
    for recipe in found.values():
        for segment in recipe.segments:
            by_name.setdefault(segment.name, set()).add(segment_options(segment))
    assert len(by_name['CDNSR-FSRCNN branches']) == 1 and len(by_name['ClassSR-FSRCNN branches']) == 1
    assert all(len(options) == 1 for options in by_name.values()), [n for n, o in by_name.items() if len(o) > 1]
    # and the runs differ where the recipes do: the alpha of each CDNSR variant, the batch of the ablation
    alphas = {
        recipe.alpha: recipe.final.opt['train']['losses']['flops']['alpha']
        for name, recipe in found.items() if name.startswith('CDNSR-FSRCNN')
    }
    assert alphas == {a: a for a in reproduce_cpu.SWEEP}
    small = found['ClassSR classifier at batch 16'].final
    assert small.opt['train']['stages'][small.stages[0]]['batch_size_per_gpu'] == 16
    recipe = found['ClassSR-FSRCNN'].segments[1]
    assert recipe.opt['train']['stages'][recipe.stages[0]]['batch_size_per_gpu'] == 96


def test_every_stage_is_trained_once_and_in_order():
    """Each recipe's segments cover its option file's stages from the first it trains, each once, in order."""
    for name, recipe in reproduce_cpu.recipes(1.0).items():
        trained = [i for segment in recipe.segments for i in segment.stages]
        last = len(recipe.final.opt['train']['stages'])
        assert trained == list(range(trained[0], last)), (name, trained)
        for before, segment in zip(recipe.segments, recipe.segments[1:]):
            assert segment.after == before.name or segment.parts, (name, segment.name)


def test_a_checkpoint_trained_from_other_options_is_not_reused(tmp_path):
    segment = reproduce_cpu.recipes(0.01)['ClassSR-FSRCNN'].segments[0]
    trainer = reproduce_cpu.Trainer(tmp_path, tmp_path / 'data', {})
    checkpoint = trainer.checkpoint(segment.name)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b'weights')
    checkpoint.with_name('seconds.txt').write_text('1.0')
    (tmp_path / 'options').mkdir()
    (tmp_path / 'options' / f'{reproduce_cpu.slug(segment.name)}.yml').write_text('name: other\n')
    with pytest.raises(SystemExit, match='trained from other options'):
        trainer.run(segment, {segment.name: segment})
