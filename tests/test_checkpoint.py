"""A checkpoint directory is replaced atomically: a write that fails leaves the previous one complete and takes
back the space it used."""
import errno
import os

import pytest

from halos.checkpoint import write_checkpoint_dir


def writing(value: str, fails_with=None):
    def write_files(directory):
        with open(os.path.join(directory, 'state'), 'w') as f:
            f.write(value)
        if fails_with is not None:
            raise fails_with
    return write_files


@pytest.mark.parametrize('failure', [OSError(errno.ENOSPC, 'No space left on device'), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_nothing_of_its_own(tmp_path, failure):
    latest = str(tmp_path / 'LATEST')
    write_checkpoint_dir(latest, writing('first'))
    with pytest.raises(type(failure)):
        write_checkpoint_dir(latest, writing('second', fails_with=failure))
    assert sorted(os.listdir(tmp_path)) == ['LATEST']
    assert open(os.path.join(latest, 'state')).read() == 'first'
    write_checkpoint_dir(latest, writing('third'))
    assert sorted(os.listdir(tmp_path)) == ['LATEST'] and open(os.path.join(latest, 'state')).read() == 'third'
