"""Files the library writes: atomic replacement, output directories proven writable before
any work starts, and claimed by one run at a time."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not kept apart
    fcntl = None  # type: ignore[assignment]

from .errors import UsageError


def _file_mode() -> int:
    """The mode a new file gets here (0o666 less the umask). Some writers (safetensors) create
    their files readable by the owner only; written files get this mode instead."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, sync it, then rename it over
    `path`, so a reader never sees a half-written file, even after a crash of the machine;
    the file gets the usual mode for a new file.

    A symbolic link is followed (the file it points to is replaced; the link stays), and a path
    that is not a regular file (a device such as /dev/null, a pipe) is written in place: a
    rename would put a plain file where it was. A writer's failure on a full disk (some
    writers raise their own errors for it) is an OSError saying so."""
    return atomic_write_many([(path, write)])[0]


def atomic_write_many(writes: list[tuple[str | Path, Callable[[Path], None]]]) -> list[Path]:
    """`atomic_write` for files that belong together (weights and the JSON that describes
    them): every file is written to its temporary and synced first, and only then are they
    renamed over their paths, so a write that fails leaves the earlier set whole."""
    targets, staged = [], []  # staged: (temporary, target)
    try:
        for path, write in writes:
            path = Path(path)
            if path.is_symlink():
                path = Path(os.path.realpath(path))
            if path.is_dir():
                raise UsageError(f"cannot write {path}: a directory is in the way")
            targets.append(path)
            if path.exists() and not path.is_file():
                _write(write, path, path)
                continue
            remove_stale_temporaries(path)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            staged.append((tmp, path))
            _write(write, tmp, path)
            os.chmod(tmp, _file_mode())
            with tmp.open("rb") as fh:  # on disk before the rename: a crash leaves old or new
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return targets


def remove_stale_temporaries(path: Path) -> list[str]:
    """Delete the temporaries of `path` (`.NAME.tmpPID`) that a killed writer left: those whose
    process is gone. Returns their names."""
    removed = []
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = old.name[len(path.name) + 5:]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if old.is_dir() and not old.is_symlink():  # a directory staged whole
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
            removed.append(old.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write(write: Callable[[Path], None], to: Path, path: Path) -> None:
    """`write(to)`; a failure for want of space is an OSError naming `path`, whatever the
    writer raised (safetensors and torch.save have errors of their own for a short write)."""
    try:
        write(to)
    except OSError:
        raise
    except Exception as err:
        if "No space left" in str(err) or shutil.disk_usage(to.parent).free < 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


_CREATED: list[Path] = []  # directories `writable_dir` made in this process, outermost first


def why_unreadable(path: str | Path) -> str | None:
    """The system's reason a file cannot be opened for reading (e.g. "Permission denied"),
    or None when it can: a reader's failure is then the file's contents."""
    try:
        with open(path, "rb"):
            return None
    except OSError as err:
        return err.strerror or str(err)


def writable_dir(path: str | Path) -> Path:
    """Create the directory and prove it writable, or raise a UsageError saying why."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; an output directory was expected")
    missing = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(reversed(missing))
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write the output directory {out}: {err.strerror or err}") \
            from None
    return out


LOCK = ".adaptive-loop.lock"  # an output directory's claim (see `claimed`)
_HELD: dict[str, int] = {}  # the claims this process holds: lock file -> depth


def lock_file(output: str | Path) -> Path:
    """Where the claim on an output lives: inside a directory (`DIR/.adaptive-loop.lock`),
    beside a file (`.NAME.lock`)."""
    out = Path(output)
    return out / LOCK if out.is_dir() else out.with_name(f".{out.name}.lock")


@contextmanager
def claimed(output: str | Path) -> Iterator[str | None]:
    """Hold `output` (a directory, or a file to be written) for one run: another process
    that tries to claim it meanwhile is refused with a UsageError, so that two runs never
    append to the same resumable files or replace each other's results. The same process
    may claim it again inside (a command claims before loading, the library call again).

    The claim is an advisory lock on a lock file (`lock_file`), which the system drops when
    the process ends, however it ends; the file is deleted when the claim ends (one a killed
    run left is taken over). Yields None, or a note when the file system takes no locks
    (then runs are not kept apart)."""
    lock = lock_file(output)
    key = os.path.abspath(lock)
    if key in _HELD or fcntl is None:  # held already, or not a POSIX system
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield None
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    fd, note = _lock(lock, output)
    _HELD[key] = 1
    try:
        yield note
    finally:
        del _HELD[key]
        try:
            lock.unlink()  # while still held: a run that opened it before now finds it gone
        except OSError:
            pass
        os.close(fd)


def _lock(lock: Path, output: str | Path) -> tuple[int, str | None]:
    """Open and lock `lock`: the descriptor, and a note when locks are not available."""
    busy = f"another run is writing {output}; wait for it to end, or give another --out"
    for _ in range(8):
        try:  # opened for writing: NFS takes an exclusive lock on no other kind
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, _file_mode())
        except PermissionError:  # another user's (their run, or one a killed run left):
            try:  # a local file system locks it read-only too
                fd = os.open(lock, os.O_RDONLY)
            except OSError as err:
                raise UsageError(f"cannot write {lock}: {err.strerror or err}") from None
        except OSError as err:
            raise UsageError(f"cannot write {lock}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(busy) from None
        except OSError as err:  # a file system without locks
            return fd, (f"{output} cannot be locked here ({err.strerror or err}): start no "
                        f"other run into it until this one ends")
        try:  # the holder before us may have deleted it as it let go: take the new one then
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd, None
        except FileNotFoundError:
            pass
        os.close(fd)
    raise UsageError(busy)  # taken and let go again and again: runs keep arriving


def forget_created() -> None:
    """Start a run: the directories made so far are not this run's to remove."""
    _CREATED.clear()


def remove_created_if_empty() -> None:
    """After a failed run: remove the output directories it made and left empty (innermost
    first; a directory holding anything stays)."""
    for directory in reversed(_CREATED):
        try:
            directory.rmdir()
        except OSError:  # not empty, or already gone
            pass
    _CREATED.clear()


class JsonLines:
    """An append-only file of JSON objects, one per line, each flushed and synced as written.

    A torn last line (a run killed while writing it) is dropped on load and reported; any other
    unreadable line means the file is damaged and is an error naming the line.
    """

    def __init__(self, path: str | Path, what: str, required: tuple[str, ...] = (),
                 check: Callable[[dict], bool] = lambda row: True) -> None:
        self.path = Path(path)
        self.what = what  # "a sweep point": for error messages
        self.required = required  # keys every object must have
        self.check = check  # and what else it must satisfy

    def load(self, repair: bool = True) -> tuple[list[dict], str | None]:
        """The objects in file order, and a note when a torn last line was dropped (and, with
        `repair`, cut from the file: leave that to the file's writer)."""
        if not self.path.exists():
            return [], None
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise UsageError(f"cannot read {self.path}: {err.strerror or err}") from None
        good, note = len(data), None
        if data and not data.endswith(b"\n"):
            good = data.rfind(b"\n") + 1
            note = (f"{self.path}: dropped a torn last line ({len(data) - good} bytes, a run "
                    f"stopped while writing it); that work runs again")
        rows = []
        for number, line in enumerate(data[:good].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or any(k not in row for k in self.required) or \
                    not self.check(row):
                raise UsageError(f"{self.path}:{number}: not {self.what}; the file is damaged "
                                 f"(delete that line or use another --out)")
            rows.append(row)
        if repair and good < len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        return rows, note

    def append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
