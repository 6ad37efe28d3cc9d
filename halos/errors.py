"""Errors a user can fix, and how the entry points report them.

Every such error says where the problem is (the file, the record and the field; the config key; the
checkpoint). train.py, eval.py, label.py and compare.py print it as one line on stderr and exit with
status 2, without a traceback; HYDRA_FULL_ERROR=1 shows the traceback instead.
"""
import contextlib
import os
import sys


class UserError(Exception):
    """A problem in the user's data, config or files; the message names where it is and what to change."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (or dataset), the record and the field."""


class ConfigError(UserError, ValueError):
    """A config key that is missing, unknown or inconsistent with another."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs (data, checkpoint, model) that is not there."""


class HubUnavailableError(UserError, ConnectionError):
    """The Hugging Face hub could not be reached for a dataset that has no local copy."""


@contextlib.contextmanager
def reported_as_one_line(program: str):
    """Turn a UserError raised inside into `<program>: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as error:
        if os.environ.get('HYDRA_FULL_ERROR') == '1':
            raise
        message = ' '.join(str(error).split('\n'))
        print(f'{program}: {message}', file=sys.stderr, flush=True)
        sys.exit(2)
