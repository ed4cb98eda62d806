"""Writing files and folders so that a reader (or a later resume) sees the old version or the new
one, never a half-written one, even when the process is killed or the disk fills up mid-write.

One owner for the write-to-temporary-then-rename pattern: JSON results, reports, figures, zoo
entries, data caches, forecasts and checkpoints all go through :func:`atomic_write` (a file) or
:func:`atomic_folder` (a folder). Temporary names start with a dot and end in ``.tmp`` so that
they are hidden from listings and easy to clean up. Standard library only: every layer may use it.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)  # what a killed earlier writer of this file left
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(str(tmp))
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically and fsynced. NaN/Inf are refused (not valid JSON)."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Fill a temporary folder beside ``path`` inside the ``with`` block; on success it is renamed
    to ``path``. An existing ``path`` is an error unless ``replace``: then it is swapped out only
    once the new folder is complete. On failure nothing at ``path`` changes.

    The folder gets the permissions of a plain ``mkdir`` (the umask decides, not ``0700``), and
    temporary folders left beside ``path`` by a killed earlier run are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        _umask_modes(tmp)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            if not replace:
                raise FileExistsError(f"{path}: exists")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "old")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists():
                path.rmdir()  # an empty folder the caller made
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


class OutputPathError(ValueError):
    """An output path that cannot be used (one-line message, nothing was created)."""


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
