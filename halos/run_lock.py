"""One run at a time in a run directory: a second train.py of the same exp_name, started while the first still
trains, would write over its checkpoints and rounds, so it stops at once instead.

The lock is an flock on `<run_dir>/.lock`, taken by rank 0 and released by the kernel however the process ends
(a crash or a kill leaves nothing to clean up). A file system without locks (some network mounts) runs unlocked.
"""
import contextlib
import errno
import fcntl
import os
import socket
from typing import Iterator, Sequence

from halos.errors import ConfigError

LOCK = '.lock'


@contextlib.contextmanager
def exclusive_run_dir(run_dir: str, disposable: Sequence[str] = ()) -> Iterator[None]:
    """Hold the run directory's lock while the body runs; a directory made here that is left holding only the
    lock and `disposable` files (the run stopped before it wrote anything to keep) is removed again."""
    made = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    with open(path, 'a+') as handle:
        if lock_or_refuse(handle, run_dir):
            handle.truncate(0)
            handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
            handle.flush()
        try:
            yield
        finally:
            left = os.listdir(run_dir)
            if made and set(left) <= {LOCK, *disposable}:  # removed while still locked
                for name in sorted(left, key=lambda name: name == LOCK):
                    os.remove(os.path.join(run_dir, name))
                os.rmdir(run_dir)


def lock_or_refuse(handle, run_dir: str) -> bool:
    """Lock the open lock file; False where the file system has no locks."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or 'another process'
        raise ConfigError(f"{run_dir} is in use by a run that is still training ({holder}): wait for it to end, "
                          f"stop it, or give this run another exp_name") from None
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True
