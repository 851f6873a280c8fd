"""Building, verifying and loading ``ce_dice.c``: compiled once per machine into a cache directory, loaded with ctypes.

Trust rules (nothing found on disk is loaded unless this process can tell it is ours and intact):

* The cache directory is created ``0700``; whether created or found, it must be owned by the current user and not
  writable by group or others. Otherwise a warning names it and the kernels are built in a private fresh directory
  (``tempfile.mkdtemp``, removed after loading).
* A library is compiled in a private temporary directory, then written into the cache atomically (a temporary name,
  ``fsync``, ``rename``) with mode ``0644``, and its SHA-256 and size are recorded beside it (``<name>.sha256``).
* A cached library is opened once (no symbolic link), checked on that open file (regular file, ours, not writable by
  group or others, the recorded size) and its bytes hashed; on any mismatch both files are removed and the library is
  rebuilt, never loaded.
* What is loaded is a private copy of exactly the bytes that were hashed (or just compiled), written under a unique
  name in the verified directory (reached through its open descriptor on Linux) and unlinked right after ``dlopen``.
* The symbol lookup after ``dlopen`` is inside the failure handling.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Literal

_SOURCE = Path(__file__).with_name("ce_dice.c")
_FLAG_SETS = (  # the first that builds and loads wins
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp"],
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],  # compilers without -march=native
)
_DEFAULT_COMPILERS = ("cc", "gcc", "clang")
_SYMBOLS = ("lomix_groups_forward", "lomix_groups_backward", "lomix_openmp")
_LOCK = threading.Lock()
_STATE: dict = {}

Mode = Literal["off", "auto", "force"]


class NativeUnavailable(RuntimeError):
    """The kernels cannot be used in this process; the message says why, ``short`` in a few words."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


def mode() -> Mode:
    """``LOMIX_NATIVE``: unset or ``auto`` (use the kernels when they build), ``0`` (off) or ``1`` (force)."""
    raw = os.environ.get("LOMIX_NATIVE", "")
    value = raw.strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on", "force"):
        return "force"
    raise ValueError(
        f"LOMIX_NATIVE must be 0 (off), 1 (force: fail if the kernels cannot be used) or auto, got {raw!r}"
    )


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (switched off, or not usable: one warning saying why); built on first call.

    Raises:
        RuntimeError: With ``LOMIX_NATIVE=1`` when the kernels cannot be built or loaded (the reason is named).
    """
    current = mode()
    if current == "off":
        return None
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"], _STATE["reason"], _STATE["short"] = _load(), None, None
            except NativeUnavailable as err:
                _STATE["lib"], _STATE["reason"], _STATE["short"] = None, str(err), err.short
        lib, reason = _STATE["lib"], _STATE["reason"]
        if lib is None and current == "force":
            raise RuntimeError(f"LOMIX_NATIVE=1 but the native CPU kernels cannot be used: {reason}")
        if lib is None and not _STATE.get("warned"):
            _STATE["warned"] = True
            warnings.warn(
                f"lomix_lightning: using the PyTorch engine for the loss (same values, slower on the CPU) because "
                f"{reason} (LOMIX_NATIVE=0 selects it without this warning)",
                RuntimeWarning,
                stacklevel=3,
            )
    return lib


def first_note(reason: str) -> bool:
    """Whether ``reason`` (why some maps run on PyTorch) is new in this process; records it (log it once)."""
    with _LOCK:
        noted = _STATE.setdefault("noted", set())
        new = reason not in noted
        noted.add(reason)
    return new


def unavailable_reason() -> str | None:
    """In a few words, why :func:`library` returned ``None`` (``None`` if it loaded or was not tried yet)."""
    if mode() == "off":
        return "LOMIX_NATIVE=0"
    return _STATE.get("short")


# ---------------------------------------------------------------- the compiler
def _compiler() -> tuple[str, list[str]]:
    """The compiler's path and extra flags: ``$CC`` split like a shell (``CC='gcc -m64'``), else cc, gcc or clang."""
    given = os.environ.get("CC", "").strip()
    if not given:
        for name in _DEFAULT_COMPILERS:
            found = shutil.which(name)
            if found:
                return found, []
        raise NativeUnavailable(
            "no C compiler was found (none of cc, gcc, clang is on PATH; or set CC)", "no C compiler"
        )
    try:
        words = shlex.split(given)
    except ValueError as err:
        raise NativeUnavailable(
            f"CC={given!r} cannot be split into a command and flags ({err})", "CC unusable"
        ) from None
    found = shutil.which(words[0]) if words else None
    if found is None:
        raise NativeUnavailable(
            f"CC={given!r} is unusable: {words[0]!r} is not an executable file or on PATH", "CC unusable"
        )
    return found, words[1:]


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags (a cached build is per CPU)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(compiler: str, flags: list[str], source: bytes) -> bytes:
    """The library built from ``source`` in a private temporary directory (nobody else can touch the output)."""
    with tempfile.TemporaryDirectory(prefix="lomix_lightning-build-") as build:
        src, out = os.path.join(build, "ce_dice.c"), os.path.join(build, "ce_dice.so")
        with open(src, "wb") as handle:
            handle.write(source)
        command = [compiler, *flags, "-fPIC", "-shared", "-std=c99", "-o", out, src, "-lm"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        with open(out, "rb") as handle:
            return handle.read()


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


def _open_cache() -> tuple[int, Path, str | None]:
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
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _remove(dir_fd: int, *names: str) -> None:
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:  # missing, or the directory is read-only (then nothing was written either)
            pass


def _read_file(dir_fd: int, name: str, limit: int) -> tuple[os.stat_result, bytes]:
    """``fstat`` and content of ``name`` (no symbolic link), opened once: the checks and the bytes are one file."""
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
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


def _record(data: bytes) -> bytes:
    """What ``<name>.sha256`` holds: the library's SHA-256 and size."""
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()


def _verified(dir_fd: int, name: str) -> bytes | None:
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
                record_info, record = _read_file(dir_fd, name + ".sha256", 4096)
                problem = _untrusted(record_info, "file")
            except OSError:
                record, problem = b"", None
            if problem is None and record != _record(data):
                expected = record.decode(errors="replace").split()
                size = f"{len(data)} bytes, recorded {expected[1]}" if len(expected) == 2 else "no valid record"
                problem = f"its size or SHA-256 does not match the record ({size})"
    if problem is None:
        return data
    _remove(dir_fd, name, name + ".sha256")
    warnings.warn(
        f"lomix_lightning: removed the cached kernel library {name!r}: {problem}; rebuilding it",
        RuntimeWarning,
        stacklevel=5,
    )
    return None


def _write(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write ``name`` atomically: a fresh temporary name (``O_EXCL``), ``fsync``, then ``rename`` over ``name``."""
    tmp = f".{name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode, dir_fd=dir_fd)
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
        _remove(dir_fd, tmp)
        raise


def _publish(dir_fd: int, name: str, data: bytes) -> None:
    """Store a library built by this process in the cache, then its record (a library without one is rebuilt)."""
    _write(dir_fd, name, data, 0o644)
    _write(dir_fd, name + ".sha256", _record(data), 0o644)


def _dlopen(dir_fd: int, directory: Path, data: bytes) -> ctypes.CDLL:
    """Load exactly ``data``: a private copy under a unique name in the verified directory, unlinked after loading.

    On Linux the copy is reached through the directory's open descriptor (``/proc/self/fd``), so a directory swapped
    after the checks is never read. The unique name also keeps ``dlopen`` from returning an earlier library by name.
    """
    name = f".load-{os.getpid()}-{secrets.token_hex(8)}.so"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        through_fd = f"/proc/self/fd/{dir_fd}"
        base = through_fd if os.path.isdir(through_fd) else str(directory)
        return ctypes.CDLL(os.path.join(base, name))
    finally:
        _remove(dir_fd, name)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the entry points' signatures (``AttributeError`` if a symbol is missing)."""
    for name in _SYMBOLS[:2]:
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
        function.restype = None
    lib.lomix_openmp.restype = ctypes.c_int32
    lib.openmp = bool(lib.lomix_openmp())
    return lib


def _candidates(compiler: str, extra: list[str], source: bytes) -> list[tuple[list[str], str]]:
    """``(flags, cache file name)`` per flag set, the name keyed by the source, compiler, flags and CPU."""
    machine, out = _cpu_id().encode(), []
    for flags in _FLAG_SETS:
        flags = [*extra, *flags]
        key = hashlib.sha256(b"\0".join([source, "\0".join(flags).encode(), compiler.encode(), machine]))
        out.append((flags, f"ce_dice-{key.hexdigest()[:16]}.so"))
    return out


def _describe(err: BaseException) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        stderr = (err.stderr or b"").decode(errors="replace").strip()[:300]
        return f"the compiler exited with status {err.returncode}" + (f": {stderr}" if stderr else "")
    return f"{type(err).__name__}: {err}"


def _load() -> ctypes.CDLL:
    """Load the cached library (verified) or build, store and load it; :class:`NativeUnavailable` saying why not."""
    if sys.platform == "win32":
        raise NativeUnavailable("the kernels are not built on Windows", "Windows")
    compiler, extra = _compiler()
    source = _SOURCE.read_bytes()
    dir_fd, directory, private = _open_cache()
    errors: list[str] = []
    try:
        for flags, name in _candidates(compiler, extra, source):
            cached = _verified(dir_fd, name)
            for data in [cached, None] if cached is not None else [None]:  # a cached one that fails: rebuilt
                try:
                    if data is None:
                        data = _compile(compiler, flags, source)
                        _publish(dir_fd, name, data)
                    return _bind(_dlopen(dir_fd, directory, data))
                except (OSError, subprocess.SubprocessError, AttributeError) as err:
                    if _describe(err) not in errors:
                        errors.append(_describe(err))
                    _remove(dir_fd, name, name + ".sha256")
    finally:
        os.close(dir_fd)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    raise NativeUnavailable(f"building or loading the kernels failed ({'; '.join(errors)})", "build failed")
