"""One writer per run directory: a lock file that names the process holding it.

Two runs writing the same directory interleave their checkpoints and events without a word, so
a run takes `<directory>/.termwise.lock` before it writes there. The file holds the owner's pid,
host and process start time. It is created atomically (`O_CREAT | O_EXCL`) and removed when the
process exits (`atexit`, which also runs after SIGTERM and Ctrl-C, whose handlers exit through
`sys.exit`). A lock left by a process that died without removing it (`kill -9`, a crash, a
second Ctrl-C) is taken over with a warning when its owner is provably gone: same host, and no
live process with that pid and start time. An owner on another host is assumed alive: the
error says which file to delete if it is not.

The lock is per process: several Trainers of one process may share a directory (a test that
trains, then resumes, in one process), as they share the process's lock.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
import time

from absl import logging

__all__ = [
    "RunDirectoryError",
    "LOCK_NAME",
    "LockError",
    "Owner",
    "RunLock",
    "check_directory",
    "lock_directories",
]

LOCK_NAME = ".termwise.lock"


class RunDirectoryError(ValueError):
    """A run directory that cannot be used: one line naming it (found before any step)."""


class LockError(RunDirectoryError):
    """Another live run holds the directory: one line naming the owner."""


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a lock: pid, host, process start time (a token from /proc) and since when."""

    pid: int
    host: str
    start: str | None = None
    since: float | None = None

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), socket.gethostname(), _process_start(os.getpid()), time.time())

    def describe(self) -> str:
        since = (
            time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(self.since))
            if self.since
            else ""
        )
        return f"pid {self.pid} on host {self.host}{since}"

    def same_process(self, other: Owner) -> bool:
        return (self.pid, self.host, self.start) == (other.pid, other.host, other.start)

    def alive(self) -> bool:
        """False only when the owner is provably gone (this host, no such live process)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's live process
            pass
        if self.start is not None:
            start = _process_start(self.pid)
            if start is not None and start != self.start:
                return False  # the pid was reused by a later process
        return True


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _read(path: str) -> Owner | None:
    """The owner a lock file names, or None when it is unreadable or garbled."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return Owner(int(data["pid"]), str(data["host"]), data.get("start"), data.get("since"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """The lock of one run directory (`<directory>/.termwise.lock`).

    Args:
        directory: the run directory (created by `acquire` when missing).
        option: the argument that named the directory, for the error message (`log_dir`).

    Raises (from `acquire`):
        LockError: when another live process holds the directory.
    """

    def __init__(self, directory: str, option: str = "log_dir"):
        self.directory = directory
        self.option = option
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False
        self._owner = Owner.this_process()

    def acquire(self, create: bool = True) -> bool:
        """Takes the lock (at once, or raises); returns whether it is held.

        Args:
            create: create the directory when it is missing. With False, a missing directory is
                left alone and the lock is not taken (nothing can be in it yet).
        """
        if self.held:
            return True
        if not os.path.isdir(self.directory):
            if not create:
                return False
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as error:
                raise RunDirectoryError(
                    f"`{self.option}` ({self.directory}) cannot be created: {error.strerror}."
                ) from None
        for _ in range(5):
            if self._create():
                return True
            owner = _read(self.path)
            if owner is None:  # being written this instant, or left garbled by a crash
                time.sleep(0.05)
                owner = _read(self.path)
                if owner is None:
                    self._take_over(None)
                    continue
            if owner.same_process(self._owner):
                self.held = True  # another Trainer of this process holds it
                atexit.register(self.release)
                return True
            if owner.alive():
                raise LockError(
                    f"`{self.option}` ({self.directory}) is in use by another run "
                    f"({owner.describe()}): wait for it to end or pass another `{self.option}`; "
                    f"if that process is gone, delete {self.path}."
                )
            self._take_over(owner)
        raise LockError(f"Could not take the lock {self.path}: other processes keep taking it.")

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise RunDirectoryError(
                f"`{self.option}` ({self.directory}) is not writable: {error.strerror}; pass "
                f"another `{self.option}`."
            ) from None
        owner = self._owner
        record = {"pid": owner.pid, "host": owner.host, "start": owner.start, "since": owner.since}
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        self.held = True
        atexit.register(self.release)
        return True

    def _take_over(self, stale: Owner | None) -> None:
        """Removes a dead owner's lock file, unless another process replaced it meanwhile."""
        aside = f"{self.path}.{os.getpid()}.stale"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another process removed it first
        moved = _read(aside)
        if stale is not None and moved != stale:  # we moved a live lock taken meanwhile: undo
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        what = stale.describe() if stale is not None else "an unreadable lock file"
        logging.warning(
            "Taking over %s: the run that held it (%s) ended without releasing it.",
            self.path,
            what,
        )

    def release(self) -> None:
        """Removes the lock file if this process holds it (idempotent; runs at exit)."""
        if not self.held:
            return
        self.held = False
        owner = _read(self.path)
        if owner is not None and owner.same_process(self._owner) and owner.pid == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def check_directory(path: str, option: str) -> None:
    """Checks, writing nothing, that `path` is or can become a writable directory.

    Remote paths (`gs://...`) are left to their file system.

    Raises:
        RunDirectoryError: naming `option` for a file where the directory should be, a parent
            that is a file, or a directory (or nearest existing parent) this process cannot
            write.
    """
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if existing == os.path.abspath(path) and not os.path.isdir(existing):
        raise RunDirectoryError(
            f"`{option}` ({path}) is a file, not a directory: remove it or pass another `{option}`."
        )
    if not os.path.isdir(existing):
        raise RunDirectoryError(
            f"`{option}` ({path}) cannot be created: {existing} is a file, not a directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == os.path.abspath(path) else f" ({existing} is not writable)"
        raise RunDirectoryError(
            f"`{option}` ({path}) is not writable by this process{where}: pass another `{option}`."
        )


def lock_directories(log_dir: str | None, checkpoint_dir: str | None) -> list[tuple[str, str]]:
    """(option, directory) pairs to lock: the log directory, and the checkpoint directory too
    unless it lies inside it (one lock covers a run directory and what is under it)."""
    pairs = []
    if log_dir:
        pairs.append(("log_dir", log_dir))
    if checkpoint_dir:
        inside = log_dir and os.path.abspath(checkpoint_dir).startswith(
            os.path.abspath(log_dir).rstrip(os.sep) + os.sep
        )
        if not inside and not (
            log_dir and os.path.abspath(checkpoint_dir) == os.path.abspath(log_dir)
        ):
            pairs.append(("checkpoint_dir", checkpoint_dir))
    return [(o, d) for o, d in pairs if "://" not in d]
