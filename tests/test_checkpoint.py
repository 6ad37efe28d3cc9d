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


def test_a_run_is_refused_a_directory_in_another_runs_checkpoint_or_an_hf_model_directory(tmp_path):
    from halos.checkpoint import check_run_dir
    from halos.errors import ConfigError
    run = tmp_path / 'run'
    (run / 'LATEST' / 'hf').mkdir(parents=True)
    (run / 'step-8').mkdir()
    (run / 'config.yaml').write_text('exp_name: run\n')
    (run / 'LATEST' / 'hf' / 'config.json').write_text('{}')
    for inside, checkpoint in ((run / 'LATEST' / 'hf', run / 'LATEST'), (run / 'LATEST', run / 'LATEST'),
                               (run / 'step-8' / 'new', run / 'step-8')):
        with pytest.raises(ConfigError) as error:
            check_run_dir(str(inside))
        where = 'is' if inside == checkpoint else 'lies in'
        assert str(error.value) == (f"{inside} {where} {checkpoint}, a checkpoint of the run in {run}: give the new "
                                    f"run a directory of its own (exp_name, cache_dir)")
    model = tmp_path / 'models' / 'llama'
    model.mkdir(parents=True)
    (model / 'config.json').write_text('{}')
    with pytest.raises(ConfigError, match=r"llama is an HF model directory \(it holds config.json\), not a run's"):
        check_run_dir(str(model))
    for fine in (run, run / 'sub', tmp_path / 'LATEST', tmp_path / 'new'):  # a run, beside one, or a LATEST of no run
        check_run_dir(str(fine))
