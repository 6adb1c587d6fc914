"""Weight files that cannot be loaded safely (a pickle that runs code, a truncated file, not a PyTorch file): the
tester and the VGG-19 loader refuse them in one paragraph naming the file, without torch's multi-line text and
its advice to load the file with ``weights_only=False``; no code from the file runs."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from cdnsr_plugin.tester.cli import main
from cdnsr_plugin.utils.checkpoint import read_state_dict


class Payload:
    """Unpickling it calls ``os.mkdir(marker)``: what a malicious checkpoint does (harmlessly here)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker), )


def bad_files(folder: Path, source: Path) -> dict[str, Path]:
    """A malicious pickle, a truncated copy of ``source``, and a text file, each a ``.pth``."""
    evil, truncated, text = folder / 'evil.pth', folder / 'truncated.pth', folder / 'text.pth'
    torch.save({'params': Payload(folder / 'pwned')}, evil)
    truncated.write_bytes(source.read_bytes()[:4000])
    text.write_text('not a checkpoint')
    return {'evil': evil, 'truncated': truncated, 'text': text}


def one_paragraph(message: str, path: Path) -> None:
    assert str(path) in message and '\n' not in message.strip() and 'weights_only' not in message
    assert 'Traceback' not in message and 'Check the documentation' not in message


def test_a_malicious_or_broken_checkpoint_is_refused_in_one_paragraph_naming_the_file(setup, tmp_path, capsys):
    root, _ = setup
    files = bad_files(tmp_path, root / 'net.pth')
    lr = tmp_path / 'lr'
    lr.mkdir()
    shutil.copy(sorted((root / 'lr').iterdir())[0], lr)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in lr.iterdir()}
    expected = {
        'evil': 'is refused: loading it would call posix.mkdir, and a file that calls functions when loaded can run',
        'truncated': 'cannot be read (RuntimeError: PytorchStreamReader failed',
        'text': 'cannot be read (UnpicklingError: Unsupported operand',
    }
    for kind, path in files.items():
        out = tmp_path / f'out_{kind}'
        code = main([
            str(a)
            for a in ('--input', lr, '--checkpoint', path, '--network', root / 'net.yml', '--scale', 4, '--out', out)
        ])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f'error: checkpoint {path} ') and expected[kind] in err, err
        one_paragraph(err, path)
        assert not out.exists()  # refused before any output: the folder it made for the check is gone too
    with pytest.raises(ValueError, match='nothing was loaded from it'):
        read_state_dict(files['evil'])
    assert not (tmp_path / 'pwned').exists()  # the payload never ran
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in lr.iterdir()} == before


def test_a_vgg_file_that_cannot_be_loaded_safely_is_named_in_one_paragraph(setup, tmp_path):
    """The VGG-19 weights of ContrastiveKDLoss: torch's multi-line error (with its weights_only=False advice)
    became one paragraph naming the file; a file that is not a state dict is named too."""
    from cdnsr_plugin.losses.distill_loss import ContrastiveKDLoss
    root, _ = setup
    files = bad_files(tmp_path, root / 'net.pth')
    torch.save([1, 2], tmp_path / 'list.pth')
    for kind, path in [*files.items(), ('list', tmp_path / 'list.pth')]:
        with pytest.raises(ValueError) as info:
            ContrastiveKDLoss(vgg_weights=str(path))
        message = str(info.value)
        assert message.startswith('ContrastiveKDLoss: ') and ('VGG-19' in message), message
        one_paragraph(message, path.resolve())
    assert not (tmp_path / 'pwned').exists()
