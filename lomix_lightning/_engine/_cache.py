"""The kernel cache directory and its files, under trust rules: nothing on disk is loaded unless it is ours, intact.

* The cache directory is created ``0700``; whether created or found, it must be owned by the current user and not
  writable by group or others. Otherwise a warning names it and the kernels are built in a private fresh directory
  (``tempfile.mkdtemp``, removed after loading).
* A library is compiled in a private temporary directory, then written into the cache atomically (a temporary name,
  ``fsync``, ``rename``) with mode ``0644``, and its SHA-256 and size are recorded beside it (``<name>.sha256``).
* A cached library is opened once (no symbolic link), checked on that open file (regular file, ours, not writable by
  group or others, the recorded size) and its bytes hashed; on any mismatch both files are removed and the library is
  rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import tempfile
import warnings
from pathlib import Path


class NativeUnavailable(RuntimeError):
    """The kernels cannot be used in this process; the message says why, ``short`` in a few words."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


# ---------------------------------------------------------------- the cache directory
def _cache_candidates() -> list[Path]:
    """``$LOMIX_CACHE_DIR``; else the user cache directory, then a per-user directory in the temporary directory."""
    if os.environ.get("LOMIX_CACHE_DIR"):
        return [Path(os.environ["LOMIX_CACHE_DIR"])]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = os.geteuid() if hasattr(os, "geteuid") else "user"
    return [Path(base) / "lomix_lightning", Path(tempfile.gettempdir()) / f"lomix_lightning-{user}"]


def _untrusted(info: os.stat_result, kind: str = "directory") -> str | None:
    """Why a file or directory (its ``fstat``) is not to be trusted, or ``None``: ours and not group/other-writable."""
    if kind == "directory" and not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if kind == "file" and not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by the current user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _open_dir(path: Path) -> int:
    """Create ``path`` (``0700``) if missing and open it; the checks run on the open descriptor."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))


def open_cache() -> tuple[int, Path, str | None]:
    """``(descriptor, path, private)`` of a trusted cache directory; ``private``: a fresh one to remove after use."""
    for path in _cache_candidates():
        try:
            fd = _open_dir(path)
        except OSError:
            continue  # not creatable here: the next candidate
        problem = _untrusted(os.fstat(fd))
        if problem is not None:
            os.close(fd)
            warnings.warn(
                f"lomix_lightning: not using the kernel cache directory {str(path)!r}: {problem}. Building the kernels "
                "in a private temporary directory instead (set LOMIX_CACHE_DIR to a directory only you can write)",
                RuntimeWarning,
                stacklevel=4,
            )
            break
        if os.access(path, os.W_OK | os.X_OK):
            return fd, path, None
        os.close(fd)
    try:
        private = tempfile.mkdtemp(prefix="lomix_lightning-")
        fd = _open_dir(Path(private))
    except OSError as err:
        raise NativeUnavailable(f"no usable directory to build the kernels in ({err})", "cache unusable") from None
    return fd, Path(private), private


# ---------------------------------------------------------------- files inside the verified directory
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def remove(dir_fd: int, *names: str) -> None:
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:  # missing, or the directory is read-only (then nothing was written either)
            pass


def _read_file(dir_fd: int, name: str, limit: int) -> tuple[os.stat_result, bytes]:
    """``fstat`` and content of ``name`` (no symbolic link), opened once: the checks and the bytes are one file."""
    fd = os.open(name, os.O_RDONLY | NOFOLLOW, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return info, b""
        chunks, remaining = [], info.st_size + 1  # one byte more: a file that grew is caught by the size check
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return info, b"".join(chunks)
    finally:
        os.close(fd)


def record(data: bytes) -> bytes:
    """What ``<name>.sha256`` holds: the library's SHA-256 and size."""
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()


def verified(dir_fd: int, name: str) -> bytes | None:
    """The cached library's bytes if it is ours and matches its record; else ``None`` (a damaged one is removed)."""
    try:
        info, data = _read_file(dir_fd, name, 1 << 28)
    except FileNotFoundError:
        return None
    except OSError as err:
        problem = f"it cannot be opened as a regular file ({err})"
    else:
        problem = _untrusted(info, "file")
        if problem is None:
            try:
                record_info, recorded = _read_file(dir_fd, name + ".sha256", 4096)
                problem = _untrusted(record_info, "file")
            except OSError:
                recorded, problem = b"", None
            if problem is None and recorded != record(data):
                expected = recorded.decode(errors="replace").split()
                size = f"{len(data)} bytes, recorded {expected[1]}" if len(expected) == 2 else "no valid record"
                problem = f"its size or SHA-256 does not match the record ({size})"
    if problem is None:
        return data
    remove(dir_fd, name, name + ".sha256")
    warnings.warn(
        f"lomix_lightning: removed the cached kernel library {name!r}: {problem}; rebuilding it",
        RuntimeWarning,
        stacklevel=5,
    )
    return None


def _write(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write ``name`` atomically: a fresh temporary name (``O_EXCL``), ``fsync``, then ``rename`` over ``name``."""
    tmp = f".{name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # exactly mode, whatever the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove(dir_fd, tmp)
        raise


def publish(dir_fd: int, name: str, data: bytes) -> None:
    """Store a library built by this process in the cache, then its record (a library without one is rebuilt)."""
    _write(dir_fd, name, data, 0o644)
    _write(dir_fd, name + ".sha256", record(data), 0o644)
