"""Errors a user can fix, and how the entry points report them.

Every such error says where the problem is (the file, the record and the field; the config key; the
checkpoint). Every entry point prints it as one line on stderr and exits with status 2, without a
traceback; HYDRA_FULL_ERROR=1 shows the traceback instead.
"""
import argparse
import contextlib
import errno
import math
import os
import signal
import subprocess
import sys
from typing import Optional


class UserError(Exception):
    """A problem in the user's data, config or files; the message names where it is and what to change."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (or dataset), the record and the field."""


class ConfigError(UserError, ValueError):
    """A config key that is missing, unknown or inconsistent with another."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs (data, checkpoint, model) that is not there."""


class ContractError(UserError, TypeError):
    """A trainer, loss or dataset of one's own that gives halos what it does not take; the message names the
    class or function and what it must give."""


class TrainingDiverged(UserError, FloatingPointError):
    """A non-finite training loss: too high a learning rate, or data that drives the loss there."""


class StoppedBySignal(Exception):
    """A run asked to stop (SIGTERM: a scheduler's preemption, `kill`) that saved its checkpoint and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class HubUnavailableError(UserError, ConnectionError):
    """The Hugging Face hub could not be reached for a dataset that has no local copy."""


# HYDRA_FULL_ERROR as the user set it: halos.cli sets HYDRA_FULL_ERROR=1 itself while Hydra runs
USER_FULL_ERROR = 'HALOS_USER_FULL_ERROR'


def show_traceback() -> bool:
    return os.environ.get(USER_FULL_ERROR, os.environ.get('HYDRA_FULL_ERROR')) == '1'


def one_line(error: Exception) -> str:
    """An error's message on one line."""
    return ' '.join(str(error).split())


def shortened(value) -> str:
    """A value's repr, cut to fit in a message."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + '...'


def describe_error(error: BaseException) -> str:
    """`<type>: <message>` (the message cut to 200 characters), or the type alone when it has none."""
    return f"{type(error).__name__}: {str(error)[:200]}" if str(error) else type(error).__name__


def reported(program: str, error: UserError) -> int:
    """Print `<program>: <message>` on one line of stderr; exit status 2 (HYDRA_FULL_ERROR=1: raise it again). An
    error that every process of a torchrun meets alike (a setting's, or one met while the run is built) is printed
    by one process of each node."""
    if show_traceback():
        raise error
    alike = isinstance(error, ConfigError) or getattr(error, 'met_alike', False)
    if not alike or first_on_its_node():
        print(f"{program}: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


def first_on_its_node() -> bool:
    """Whether this is the one process of its node (of a torchrun, else the only one) that speaks for all its
    node's processes where each meets the same thing (a Ctrl-C reaches every one)."""
    return os.environ.get('LOCAL_RANK', '0') == '0'


@contextlib.contextmanager
def met_alike_by_every_process():
    """Mark a UserError raised inside as one that every process meets alike (each reads the settings and the
    whole data while the run is built), so that one process of each node names it."""
    try:
        yield
    except UserError as error:
        error.met_alike = True
        raise


# what the file system answers a run that writes where it may not, where no room is left, where a path's kind
# (file or directory) is not the one it needs, or to a name too long for it
FILE_SYSTEM_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                        errno.EEXIST, errno.ENAMETOOLONG}


@contextlib.contextmanager
def reported_as_one_line(program: str):
    """Turn a UserError raised inside into `<program>: <message>` on stderr and exit status 2; a command run
    inside that failed (which printed its own message) into one line naming it, with its exit status; a file
    system's refusal (FILE_SYSTEM_REFUSALS) into one line naming the path; Ctrl-C into
    `<program>: interrupted` and exit status 130; a stop on a signal into its line and 128 + the signal."""
    try:
        yield
    except UserError as error:
        sys.exit(reported(program, error))
    except StoppedBySignal as stop:
        if os.environ.get('RANK', '0') == '0':  # every process stops at the same step: one says so
            print(f'{program}: {stop}', file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    except OSError as error:
        if show_traceback() or error.errno not in FILE_SYSTEM_REFUSALS:
            raise
        where = f"{error.filename}: " if error.filename else ''
        a_file_in_the_way = error.errno == errno.EEXIST and error.filename and os.path.isfile(error.filename)
        what = 'a file, where a directory must be' if a_file_in_the_way else error.strerror
        print(f'{program}: {where}{what}', file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if show_traceback():
            raise
        exit_at_the_next_interrupt()
        if first_on_its_node():
            print(f'\n{program}: interrupted', file=sys.stderr, flush=True)
        sys.exit(130)
    except subprocess.CalledProcessError as error:
        if show_traceback():
            raise
        command = ' '.join(map(str, error.cmd)) if isinstance(error.cmd, (list, tuple)) else str(error.cmd)
        print(f'{program}: `{command}` failed with exit status {error.returncode} (its message is above)',
              file=sys.stderr, flush=True)
        sys.exit(error.returncode if error.returncode > 0 else 1)


def exit_at_the_next_interrupt() -> None:
    """Once a Ctrl-C is answered, another one ends the process at once (status 130): pressed again while the
    exit handlers run (wandb's), it would otherwise end in a traceback from the one it cut short."""
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))


def wait_passing_stops(pid: int) -> int:
    """The exit code of child process `pid`, a halos command that a script runs. A SIGTERM sent to the script is
    passed on to it, and a Ctrl-C (which reaches both) waits for it: either way it saves its checkpoint and
    stops, instead of running on alone or being cut off."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(pid, signum))
    try:
        try:
            _, status = os.waitpid(pid, 0)
        except KeyboardInterrupt:
            os.waitpid(pid, 0)
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return os.waitstatus_to_exitcode(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad argument ends as one line, `<program>: <message>`, with exit status 2."""

    def error(self, message: str):
        print(f'{self.prog}: {message} (--help lists the arguments)', file=sys.stderr, flush=True)
        sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return int(text)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 0")
    return int(text)


def finite_number(text: str) -> Optional[float]:
    """`text` as a finite float, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def non_negative_number(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = finite_number(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_number(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value
