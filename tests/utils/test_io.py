"""The one atomic write, and images written and read through it."""
import numpy as np
import pytest

from cdnsr_plugin.utils.io import atomic_write, read_image, write_image, write_json


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / 'new' / 'report.json'
    atomic_write(target, b'first version, longer')
    atomic_write(target, b'second')
    assert target.read_bytes() == b'second'
    with pytest.raises(TypeError):
        atomic_write(target, 'not bytes')  # fails while writing the temporary file
    assert target.read_bytes() == b'second'  # the old file is untouched
    assert [p.name for p in target.parent.iterdir()] == ['report.json']


def test_write_json_is_strict_and_write_image_round_trips(tmp_path):
    path = write_json(tmp_path / 'a.json', {'psnr': float('inf'), 'values': np.arange(3), 'n': np.int64(2)})
    assert path.read_text() == '{\n  "psnr": null,\n  "values": [\n    0,\n    1,\n    2\n  ],\n  "n": 2\n}\n'
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for suffix in ('.png', '.bmp'):
        written = write_image(tmp_path / f'image{suffix}', image)
        assert np.array_equal(read_image(written)[0], image)
    with pytest.raises(OSError, match='could not encode'):
        write_image(tmp_path / 'image.nosuchformat', image)
    assert not list(tmp_path.glob('*.nosuchformat')) and not list(tmp_path.glob('.*tmp'))


def test_links_that_lead_nowhere_are_skipped_and_listed_not_fatal(tmp_path):
    """A symlink loop or a dangling link in an input folder (once a traceback that ended the whole run of
    tools/prepare_data.py) is skipped with the reason; the real images are still listed."""
    import warnings

    from cdnsr_plugin.utils.io import Skipped, list_images
    write_image(tmp_path / 'real.png', np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / 'loop.png').symlink_to(tmp_path / 'loop.png')
    (tmp_path / 'dangling.jpg').symlink_to(tmp_path / 'gone.jpg')
    skipped = Skipped()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        assert list_images(tmp_path, skipped) == [tmp_path / 'real.png']
    reasons = dict(skipped.items)
    assert set(reasons) == {str(tmp_path / 'loop.png'), str(tmp_path / 'dangling.jpg')}
    assert all('leads nowhere' in reason for reason in reasons.values())


def exif_rotated_jpeg(img: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``img`` with an EXIF APP1 segment holding only the orientation tag (0x0112)."""
    import cv2
    ok, encoded = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    tiff = (b'MM\x00\x2a\x00\x00\x00\x08' + b'\x00\x01' + b'\x01\x12\x00\x03\x00\x00\x00\x01' +
            orientation.to_bytes(2, 'big') + b'\x00\x00' + b'\x00\x00\x00\x00')
    payload = b'Exif\x00\x00' + tiff
    data = encoded.tobytes()
    return data[:2] + b'\xff\xe1' + (len(payload) + 2).to_bytes(2, 'big') + payload + data[2:]


def test_exif_orientation_is_applied_and_noted(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise) reads upright,
    as photo viewers show it, with a note; without the tag nothing changes."""
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[:10, :, 2] = 255  # a red band at the top
    (tmp_path / 'turned.jpg').write_bytes(exif_rotated_jpeg(img, 6))
    turned, notes = read_image(tmp_path / 'turned.jpg')
    assert turned.shape == (60, 40, 3) and any('EXIF orientation' in n for n in notes)
    assert turned[:, -10:, 2].mean() > 200 and turned[:, :10, 2].mean() < 50  # the top band is now on the right
    (tmp_path / 'plain.jpg').write_bytes(exif_rotated_jpeg(img, 1))
    plain, notes = read_image(tmp_path / 'plain.jpg')
    assert plain.shape == (40, 60, 3) and notes == []


@pytest.mark.parametrize('suffix, unit', [('.gif', 'frames'), ('.webp', 'frames'), ('.png', 'frames'),
                                          ('.tif', 'pages')])
def test_animated_or_multi_page_images_note_that_only_the_first_frame_was_used(tmp_path, suffix, unit):
    """An animated GIF / WebP / PNG or a multi-page TIFF was read as its first picture without a word; now the
    reader's notes say so. A single picture in the same format gets no note (an opaque GIF no alpha note)."""
    import io

    from PIL import Image
    pictures = [Image.fromarray(np.full((20, 30, 3), 40 + 60 * i, dtype=np.uint8)) for i in range(3)]
    fmt = {'.gif': 'GIF', '.webp': 'WEBP', '.png': 'PNG', '.tif': 'TIFF'}[suffix]
    for count in (3, 1):
        buffer = io.BytesIO()
        save = {'lossless': True} if fmt == 'WEBP' else {}
        pictures[0].save(buffer, format=fmt, save_all=count > 1, append_images=pictures[1:count], **save)
        path = tmp_path / f'{count}{suffix}'
        path.write_bytes(buffer.getvalue())
        img, notes = read_image(path)
        assert img.shape == (20, 30, 3) and abs(float(img.mean()) - 40) < 3  # the first picture
        kind = 'multi-page' if unit == 'pages' else 'animated'
        assert notes == ([f'{kind} (3 {unit}): only the first {unit[:-1]} was used'] if count > 1 else [])
    from cdnsr_plugin.utils.io import list_images
    assert list_images(tmp_path) == [tmp_path / f'1{suffix}', tmp_path / f'3{suffix}']  # GIFs are images too
