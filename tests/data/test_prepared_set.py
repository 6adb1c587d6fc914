"""The prepared-set format, read and written in one place."""
import numpy as np
import pytest

from cdnsr_plugin.data.prepared_set import PreparedSet, read_labels, read_summary, write_labels, write_summary
from cdnsr_plugin.utils.io import decode_image


def test_labels_round_trip_and_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / 'labels.txt'
    write_labels(path, ['a', 'b'], np.array([0, 2]), np.array([31.25, 20.0]))
    assert read_labels(path, num_classes=3) == {'a': (0, 31.25), 'b': (2, 20.0)}
    with pytest.raises(ValueError, match=r'labels\.txt:2: label 2 of b is outside 0\.\.1'):
        read_labels(path, num_classes=2)
    path.write_text('a 0 31.2\nb two 20\n')
    with pytest.raises(ValueError, match=r'labels\.txt:2: expected "key label psnr"'):
        read_labels(path)


def test_summary_marks_completion_and_the_set_reads_its_lmdbs(tmp_path, training_data):
    with pytest.raises(FileNotFoundError, match='summary.json is missing'):
        read_summary(tmp_path)
    written = write_summary(tmp_path, {'num_classes': 3, 'complete': False, 'lq': 'elsewhere'})
    assert written == read_summary(tmp_path)  # the format's own fields are the module's, not the caller's
    assert written['complete'] is True and written['lq'] == 'lq.lmdb' and written['num_classes'] == 3
    prepared = PreparedSet(training_data[0])
    keys = sorted(prepared.labels)[:3]
    lq, gt = list(prepared.images('lq', keys)), list(prepared.images('gt', keys))
    assert [img.shape for img in lq] == [(32, 32, 3)] * 3 and [img.shape for img in gt] == [(128, 128, 3)] * 3
    with pytest.raises(ValueError, match="key 'nope'"):
        list(prepared.images('lq', ['nope']))
    assert decode_image(b'not an image') is None
