"""Writing files and folders so that a reader (or a later resume) sees the old version or the new
one, never a half-written one, even when the process is killed or the disk fills up mid-write.

One owner for the write-to-temporary-then-rename pattern: JSON results, reports, figures, zoo
entries, data caches, forecasts and checkpoints all go through :func:`atomic_write` (a file) or
:func:`atomic_folder` (a folder). Temporary names start with a dot and end in ``.tmp`` so that
they are hidden from listings and easy to clean up. Standard library only: every layer may use it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``path`` (named
    ``.<name>.<pid>-<random>.tmp``: a writer must not pick its format from the suffix), then
    rename it onto ``path``. With ``fsync`` the data is flushed to disk before the rename, and
    the rename after it."""
    path = Path(path)
    existed = path.exists()
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)  # what a killed earlier writer of this file left
        write(str(tmp))
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError) and _is_write_failure(e, tmp):
            raise WriteError.of(path, e, "the previous file is kept" if existed else "nothing was written") from None
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


class WriteError(OSError):
    """A write that failed (disk full, quota, I/O error): one line naming the file and the free
    space on its file system; the previous version of what was written is kept and no temporary
    file is left."""

    @classmethod
    def of(cls, path, error: BaseException, kept: str) -> "WriteError":
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) \
            or " ".join(str(error).split())[:160] or type(error).__name__
        code = getattr(error, "errno", None) or errno.EIO
        e = cls(code, f"{path}: cannot write ({reason}; {free_space_text(path)}); {kept}")
        e.reason, e.path = reason, Path(path)
        return e

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the file system of ``path`` or its nearest existing parent."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def free_space_text(path) -> str:
    free = free_bytes(path)
    if free is None:
        return "free space unknown"
    if free >= 2**30:
        return f"{free / 2**30:.1f} GiB free on its file system"
    return f"{free / 2**20:.1f} MiB free on its file system"


def _is_write_failure(e: OSError, *inside: Path) -> bool:
    """An OSError raised while writing ``inside`` (a temporary file or folder): not one about
    another file (an input that could not be read)."""
    name = getattr(e, "filename", None)
    return True if name is None else _inside(name, *inside)


def _inside(name, *paths: Path) -> bool:
    try:
        name = os.path.abspath(os.fspath(name))
    except TypeError:
        return False
    return any(name == os.path.abspath(p) or name.startswith(os.path.abspath(p) + os.sep) for p in paths)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically and fsynced. NaN/Inf are refused (not valid JSON)."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False, keep_others: bool = False) -> Iterator[Path]:
    """Fill a temporary folder beside ``path`` inside the ``with`` block; on success it is renamed
    to ``path``. An existing ``path`` is an error unless ``replace``: then it is swapped out only
    once the new folder is complete; with ``keep_others`` the entries of the old folder that the
    new one does not have are carried over (hard links, or copies). On failure nothing at
    ``path`` changes, and a failed write (disk full) ends in one line (:class:`WriteError`).

    The folder gets the permissions of a plain ``mkdir`` (the umask decides, not ``0700``), and
    temporary folders left beside ``path`` by a killed earlier run are removed first."""
    path = Path(path)
    existed = path.exists()
    kept = f"{path} is unchanged" if existed else f"nothing was written to {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise WriteError.of(path, e, kept) from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            yield tmp
        except OSError as e:
            name = getattr(e, "path", None) if isinstance(e, WriteError) else getattr(e, "filename", None)
            if not (_inside(name, tmp) if name is not None else not isinstance(e, WriteError)):
                raise  # about another file (an input), or already said
            where = path / os.path.relpath(os.path.abspath(name), os.path.abspath(tmp)) if name else path
            raise WriteError.of(where, e, kept) from None
        try:
            _umask_modes(tmp)
            if path.exists() and not (path.is_dir() and not any(path.iterdir())):
                if not replace:
                    raise FileExistsError(f"{path}: exists")
                if keep_others and path.is_dir():
                    _carry_over(path, tmp)
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / "old")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if path.exists():
                    path.rmdir()  # an empty folder the caller made
                os.replace(tmp, path)
            fsync_dir(path.parent)
        except FileExistsError:
            raise
        except OSError as e:
            raise WriteError.of(path, e, kept) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Entries of ``old`` that ``new`` lacks, into ``new`` (``old`` is left as it is)."""
    for n in os.listdir(old):
        src, dst = old / n, new / n
        if os.path.lexists(dst):
            continue
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif src.is_file():
            _link_or_copy(src, dst)


# --------------------------------------------------------------------------------------------
# permissions, leftovers of killed runs, output paths, walking folders


def current_umask() -> int:
    """The process's umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_modes(folder: Path) -> None:
    """Give what was written into ``folder`` the modes of plain ``open``/``mkdir`` (some writers,
    e.g. safetensors, create files ``0600``): group and others read as the umask allows."""
    mask = current_umask()
    for d, dirs, names in os.walk(folder):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o777 & ~mask)
        for n in names:
            q = os.path.join(d, n)
            if not os.path.islink(q):
                os.chmod(q, 0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # exists, owned by someone else (or not a pid: not ours to remove)
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (``.<name>.<pid>-<random>.tmp``) that a killed
    writer of ``path`` left beside it; those of a process still running are kept."""
    path = Path(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    prefix = f".{path.name}."
    for n in names:
        if not (n.startswith(prefix) and n.endswith(".tmp")):
            continue
        pid = n[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        q = path.parent / n
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q, ignore_errors=True)
        else:
            try:
                q.unlink()
            except OSError:
                continue
        removed.append(q)
    return removed


class OutputPathError(UserError, ValueError):
    """An output path that cannot be used (one-line message, nothing was created)."""


# --------------------------------------------------------------------------------------------
# ownership: one process at a time writes a run folder or an output folder

#: the lock file inside a run folder (training); ``.<name>.lock`` beside an output folder that is
#: replaced as a whole (evaluate, predict)
LOCK_NAME = ".transmem.lock"


class FolderBusy(OutputPathError):
    """Another process holds the folder's lock (one line; nothing was created or changed)."""


class FolderLock:
    """An exclusive ``flock`` on a lock file, held until :meth:`release` or the process ends
    (a killed process's lock is released by the kernel, so a stale lock file never blocks)."""

    def __init__(self, path: Path, fd: int, made_dirs: list[Path]):
        self.path, self.fd, self.made_dirs = path, fd, made_dirs

    def release(self, remove: bool = True) -> None:
        """Unlock; with ``remove`` the lock file is deleted first (while still locked, so that a
        process waiting on the old file notices: :func:`lock_folder` checks the path after
        locking), and the parent folders made for it are removed when empty."""
        if self.fd < 0:
            return
        _HELD.pop(str(self.path), None)
        if remove:
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1
        for d in reversed(self.made_dirs):
            try:
                d.rmdir()
            except OSError:
                break

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, FolderLock] = {}


def lock_path_beside(folder: str | os.PathLike) -> Path:
    """The lock file of an output folder that is replaced as a whole: ``.<name>.lock`` beside it."""
    p = Path(os.path.abspath(folder))
    return p.parent / f".{p.name}.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
    except OSError:
        return ""
    return f" (pid {text[0]})" if text and text[0].isdigit() else ""


def _busy(path: Path, fd: int, folder) -> FolderBusy:
    return FolderBusy(f"{folder}: in use by another transmem process{_holder(fd)} writing into it; wait for "
                      "it to end or choose another --out (nothing was changed)")


def lock_folder(lock_path: str | os.PathLike, folder: str | os.PathLike, tries: int = 5) -> FolderLock:
    """Take the exclusive lock ``lock_path`` that guards ``folder``, or raise :class:`FolderBusy`
    (one line). Re-entrant within a process. Missing parent folders of the lock file are made
    (and removed again on release when still empty)."""
    import fcntl

    lp = Path(os.path.abspath(lock_path))
    if str(lp) in _HELD:
        return _HELD[str(lp)]
    made: list[Path] = []
    d = lp.parent
    while not d.exists() and d != d.parent:
        made.append(d)
        d = d.parent
    made.reverse()
    for q in made:
        try:
            q.mkdir()
        except FileExistsError:
            pass
    attempt = 0
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            attempt += 1
            if attempt >= tries:  # (a few tries: a check by lock_holder holds it for microseconds)
                err = _busy(lp, fd, folder)
                os.close(fd)
                raise err from None
            os.close(fd)
            time.sleep(0.05)
            continue
        except OSError:  # no locks on this file system: the lock file alone is the claim
            pass
        try:
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    except OSError:
        pass
    lock = FolderLock(lp, fd, made)
    _HELD[str(lp)] = lock
    return lock


def lock_holder(lock_path: str | os.PathLike, folder: str | os.PathLike) -> FolderBusy | None:
    """Without creating anything: the :class:`FolderBusy` error when another process holds
    ``lock_path``, else None (no lock file, a stale one, or this process's own)."""
    import fcntl

    lp = Path(os.path.abspath(lock_path))
    if str(lp) in _HELD:
        return None
    try:
        fd = os.open(lp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _busy(lp, fd, folder)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def held_locks() -> list[Path]:
    """The lock files this process holds."""
    return [Path(p) for p in _HELD]


def held_lock(lock_path: str | os.PathLike) -> FolderLock | None:
    return _HELD.get(os.path.abspath(lock_path))


def check_output_dir(path: str | os.PathLike, min_free_bytes: int = 0, what: str = "output folder") -> Path:
    """Check, without creating anything, that ``path`` can become (or already is) a folder that
    this process can write: not an existing file, not a dangling symlink, under a folder (not a
    file), on a writable file system with at least ``min_free_bytes`` free."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputPathError(f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist; "
                              f"remove the link or choose another {what}")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a folder; choose another {what}")
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise OutputPathError(f"{probe}: is a symbolic link to {os.readlink(probe)}, which does not "
                                  f"exist; cannot create the {what} {path} under it")
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{probe}: is a file, so the {what} {path} cannot be created under it")
    try:
        st = os.statvfs(probe)
    except OSError:
        st = None
    if st is not None and st.f_flag & os.ST_RDONLY:
        raise OutputPathError(f"{probe}: on a read-only file system; cannot write the {what} {path}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{probe}: not writable (permission denied); cannot write the {what} {path}")
    if min_free_bytes > 0 and st is not None:
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise OutputPathError(f"{path}: only {free / 2**20:.0f} MiB free on its file system, below the "
                                  f"{min_free_bytes / 2**20:.0f} MiB needed; free some space or choose another "
                                  f"{what}")
    return path


def read_small_file(path: str | os.PathLike, max_bytes: int, what: str) -> bytes:
    """The bytes of a small regular file (a config, a zoo card). Folders and special files are
    refused before ``open`` (opening a FIFO blocks), and so is anything over ``max_bytes`` (read no
    further): a ValueError with one line naming the file and saying it should be ``what``."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: is a folder, not a {what}")
    if p.exists() and not p.is_file():
        raise ValueError(f"{p}: not a regular file ({special_file(p) or 'special file'}), not a {what}")
    try:
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"{p}: {what} not found") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{p}: larger than {max_bytes // 1024} KiB; not a {what}")
    return raw


def special_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (after symlinks):
    "FIFO", "device", "socket"; None otherwise (also when it does not exist)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return None


def walk(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root, followlinks=True)`` that visits every real folder once and lists only
    regular files: a symbolic link to a folder inside ``root`` (a loop back up, or a second way
    into a folder) is not followed, since that folder is walked anyway; links to folders outside
    are followed, each real folder once. FIFOs, devices and sockets are left out (opening a FIFO
    would block). ``dirs`` may be pruned or sorted in place, as with ``os.walk``."""
    top = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    for d, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(d)
        except OSError:
            dirs[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            dirs[:] = []
            continue
        seen.add(key)
        inside = []
        for n in dirs:
            q = os.path.join(d, n)
            if os.path.islink(q):
                real = os.path.realpath(q)
                if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
                    continue
            inside.append(n)
        dirs[:] = inside
        files[:] = [f for f in files if special_file(os.path.join(d, f)) is None]
        yield d, dirs, files
