"""`--storage journal:PATH`: a study in Optuna's journal file, for a cluster with a shared filesystem
and no database server.

Every worker appends its operations to the one file under Optuna's lock (a symlink beside it,
`PATH.lock`, which NFS honours where SQLite's locks break) and replays the others'. Heartbeats are
the harness's (studies/optuna_access.py): Optuna 5.0's JournalStorage has none.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import optuna

from harness.studies.options import StudyError

PREFIX = "journal:"
# Seconds before Optuna breaks a journal lock left behind (by a worker killed while writing): how long a
# beat can legitimately wait for the lock, so a journal's grace period is three beats and this.
LOCK_GRACE = 30


def journal_path(url: str) -> Path | None:
    """The journal file of a `journal:PATH` storage; None for any other URL."""
    if not url.startswith(PREFIX):
        return None
    return Path(url.removeprefix(PREFIX)).expanduser()


def check_writable(url: str) -> Path:
    """The journal file, once its folder is known to exist and take files: a probe file is created and
    removed (the lock is a file beside the journal; permission bits alone do not tell, for root)."""
    text = url.removeprefix(PREFIX)
    if not text.strip():
        raise StudyError(
            f"bad --storage {url!r}: name the journal file after journal:, e.g. journal:/shared/optuna.journal"
        )
    path = Path(text).expanduser()
    folder = path.parent
    if path.is_dir():
        raise StudyError(
            f"--storage {url}: {path} is a folder; name the journal file in it, e.g. journal:{path}/optuna.journal"
        )
    if not folder.is_dir():
        raise StudyError(
            f"no folder {folder} for the journal file of --storage {url}: create it (on the filesystem "
            "every worker shares) or fix the path"
        )
    try:
        tempfile.TemporaryFile(dir=folder, prefix=".harness-probe-").close()
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise PermissionError(errno.EACCES, "the journal file is read-only")
    except OSError as e:
        raise StudyError(
            f"cannot write the journal file {path} of --storage {url} ({e.strerror or e}): choose a "
            "folder every worker can write to, or fix its permissions"
        ) from None
    return path


def open_journal(url: str, heartbeat: int, callback):
    """The journal storage the workers write to, beating every `heartbeat` s; a trial is lost after three
    beats and `LOCK_GRACE` (a beat is stamped before it waits for the lock: measured, four workers writing
    hard on two busy cores, a beat landed in the file 8 s after its stamp)."""
    from harness.studies.optuna_access import HeartbeatJournalStorage

    path = str(check_writable(url))
    try:
        backend = optuna.storages.journal.JournalFileBackend(
            path, lock_obj=optuna.storages.journal.JournalFileSymlinkLock(path, grace_period=LOCK_GRACE)
        )
        return HeartbeatJournalStorage(
            backend,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat + LOCK_GRACE,
            heartbeat_stale_trial_callback=callback,
            url=url,
        )
    except Exception as e:
        raise unreadable(url, e) from None


def read_journal(url: str, writable: bool = True):
    """A journal storage on an existing journal file, for the commands that read: one that does not
    beat but reads the workers' beats (which trials are silent); `writable` False: one that refuses
    every write (optuna-dashboard's)."""
    from harness.studies.optuna_access import HeartbeatJournalStorage

    path = str(journal_path(url))
    try:
        backend = optuna.storages.journal.JournalFileBackend(path)
        return HeartbeatJournalStorage(backend if writable else _ReadOnly(backend), url=url)
    except Exception as e:
        raise unreadable(url, e) from None


def unreadable(url: str, e: Exception) -> StudyError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return StudyError(
        f"cannot open study storage {url} ({type(e).__name__}: {first}): check that it is an Optuna "
        "journal file (harness tune writes one with --storage journal:PATH)"
    )


class _ReadOnly(optuna.storages.journal.BaseJournalBackend):
    """Reads a journal file; never writes it (no log appended, no lock taken)."""

    def __init__(self, backend: optuna.storages.journal.BaseJournalBackend):
        self._backend = backend

    def read_logs(self, log_number_from: int):
        return self._backend.read_logs(log_number_from)

    def append_logs(self, logs) -> None:
        raise PermissionError("this journal storage is read-only")
