"""Files that survive a crash, and folders one process writes at a time: the project's file
library (every command that writes uses it).

Every file is written to a temporary name (`tmp_name`: host and pid in it) and renamed into
place; lines are appended and fsynced whole; a folder being written holds an `OutputLock`;
temporaries a killed process left behind are removed by the next run on the same host.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import psutil

from .errors import UserError, naming_file

_TMP_TAG = ".tmp-attnseg-"



def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one.
    A failed write (a full disk) removes its temporary: nothing half-written stays behind."""
    tmp = tmp_name(path)
    try:
        with naming_file(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



def append_line(path: Path, line: bytes) -> None:
    """Append one complete line and fsync it. A failed append (a full disk) is cut back off,
    so the file never ends in a torn line that a later append would glue onto."""
    with naming_file(path), open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            try:
                f.truncate(start)
            except OSError:
                pass  # the next run cuts the torn line (DatasetWriter._repair_manifest)
            raise



def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content (hex), read in chunks (engine files are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()



def check_output_dir(out: Path) -> None:
    """Fail early, with one line, if `out` cannot be created or written."""
    probe_parent = out
    while not probe_parent.exists():
        if probe_parent.parent == probe_parent:
            break
        probe_parent = probe_parent.parent
    if probe_parent.exists() and not probe_parent.is_dir():
        raise UserError(f"output folder {out} cannot be created: {probe_parent} is a file")
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable")



def tmp_name(path: Path) -> Path:
    # Host and pid in the name: concurrent shards (even on other hosts sharing the folder)
    # never touch each other's temporaries, and a resume removes only its own host's dead ones.
    return path.with_name(f"{path.name}{_TMP_TAG}{socket.gethostname()}-{os.getpid()}")



def remove_stale_temporaries(root: Path, recursive: bool = True) -> None:
    """Delete temporary files and folders (`tmp_name`) left by killed processes of this host,
    under `root` (or, with recursive=False, directly in it)."""
    host = socket.gethostname()
    pattern = f"*{_TMP_TAG}*"
    for path in list(root.rglob(pattern) if recursive else root.glob(pattern)):
        owner = path.name.rsplit(_TMP_TAG, 1)[1]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)



def holds_same_run(root: Path, doc_name: str, doc: dict, folder: str, thing: str,
                   key=lambda d: d) -> bool:
    """The check every resumable command makes before writing into `root`: True when
    `root/doc_name` records this same run (compared through `key`), False when there is no
    record yet (the caller writes it once the folder is ready); a one-line error when the
    folder records a different (or an unreadable) one."""
    path = root / doc_name
    if not path.exists():
        return False
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        previous = None
    if previous is None or key(previous) != key(doc):
        differ = "" if previous is None else differing_settings(key(previous), key(doc))
        raise UserError(f"{folder} {root} holds a different {thing} (its {doc_name} differs "
                        f"from these settings{differ}); use another --out")
    return True



def differing_settings(previous, current, limit: int = 3) -> str:
    """Where two settings records (nested dicts, as job files hold them) differ, as a clause
    for a one-line error: ": seed 0 there, 5 here; steps 3 there, 2 here and 2 more" (dotted
    names for nested settings, "unset" for a setting one of them lacks); "" when they are not
    both mappings."""
    if not isinstance(previous, dict) or not isinstance(current, dict):
        return ""
    unset = object()
    there, here = _flat_settings(previous), _flat_settings(current)
    names = [k for k in dict.fromkeys([*here, *there]) if there.get(k, unset) != here.get(k, unset)]

    def show(value) -> str:
        if value is unset:
            return "unset"
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k} {show(there.get(k, unset))} there, {show(here.get(k, unset))} here"
             for k in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (": " + "; ".join(parts) + more) if parts else ""



def _flat_settings(doc: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            flat.update(_flat_settings(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat



class OutputLock:
    """Exclusive right to write one shard of an output folder: an `flock` on
    `OUT/.lock.shard-IIIII-of-NNNNN`. A second process on the same folder and shard is refused
    with one line; other shards run alongside (of one count: synth refuses a VOC folder's run
    of another count, checking the job record under `folder_lock`). Every command that
    writes a folder holds one (unsharded: shard 0/1; see `hold_output`). The kernel drops the
    lock when its process dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, root: Path, shard: tuple[int, int] = (0, 1)):
        i, n = shard
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f".lock.shard-{i:05d}-of-{n:05d}"
        self._fd: int | None = _try_lock_file(self.path)
        if self._fd is None:
            part = "" if n == 1 else f"shard {i}/{n} of "
            raise UserError(f"another process is writing {part}{root}; wait for it to finish "
                            "(then run this again to check) or use another --out")

    def release(self) -> None:
        if self._fd is not None:
            _unlock_file(self._fd, self.path)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()



@contextlib.contextmanager
def folder_lock(root: Path, wait_s: float = 30.0):
    """A short exclusive lock on a whole output folder (`OUT/.lock`), held while a run
    compares the folder's job record with its own and records it: runs that start at once see
    each other's record, so of two different jobs (or shard counts) on one folder the second is
    refused. The holder keeps it for a moment only: a run waits up to `wait_s` for it (then is
    refused in one line: the holder is stopped or hung)."""
    import time

    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    deadline = time.monotonic() + wait_s
    while (fd := _try_lock_file(path)) is None:
        if time.monotonic() > deadline:
            raise UserError(f"another process is writing {root} (it holds {path}); wait for it "
                            "to finish (then run this again to check) or use another --out")
        time.sleep(0.05)
    try:
        yield
    finally:
        _unlock_file(fd, path)


def _try_lock_file(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive `flock`, or None when another
    process holds it. Holders remove the file when they let go (`_unlock_file`), so a lock
    taken on a file that has since been removed or replaced is dropped and taken again on the
    file now at `path`: no finished folder keeps an empty lock file."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev,
                                                                       mine.st_ino):
            return fd
        os.close(fd)  # the holder before us removed it: lock the file now at `path`


def _unlock_file(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it, then drop the lock (closing the
    descriptor): a process waiting on the removed file sees it is gone and takes a new one."""
    with contextlib.suppress(OSError):  # a lock file left behind is harmless
        os.unlink(path)
    os.close(fd)


# The locks `hold_output` took in the running `@holding_output` call.
_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnseg_held", default=None)


def holding_output(fn):
    """Decorator of a command's run function: the `OutputLock`s it takes with `hold_output`
    are released when it returns or raises (the process may go on to other work)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        held: list[OutputLock] = []
        token = _HELD.set(held)
        try:
            return fn(*args, **kwargs)
        finally:
            _HELD.reset(token)
            for lock in reversed(held):
                lock.release()

    return run


def hold_output(root: Path) -> OutputLock:
    """Take `root`'s (unsharded) `OutputLock` for the rest of the running `@holding_output`
    call: a second process writing the folder is refused in one line. Take it once the
    arguments are checked (it creates the folder) and before the first write."""
    held = _HELD.get()
    if held is None:
        raise RuntimeError("hold_output outside a @holding_output call")
    lock = OutputLock(root)
    held.append(lock)
    return lock
