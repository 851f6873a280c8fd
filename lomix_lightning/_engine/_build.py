"""Building, verifying and loading ``ce_dice.c``: compiled once per machine into a cache directory, loaded with ctypes.

The cache's trust rules are in :mod:`lomix_lightning._engine._cache` (a private ``0700`` directory, a SHA-256 and size
recorded beside each library and checked before use). Loading:

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
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Literal

from lomix_lightning._engine._cache import NOFOLLOW, NativeUnavailable, open_cache, publish, remove, verified

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


def _dlopen(dir_fd: int, directory: Path, data: bytes) -> ctypes.CDLL:
    """Load exactly ``data``: a private copy under a unique name in the verified directory, unlinked after loading.

    On Linux the copy is reached through the directory's open descriptor (``/proc/self/fd``), so a directory swapped
    after the checks is never read. The unique name also keeps ``dlopen`` from returning an earlier library by name.
    """
    name = f".load-{os.getpid()}-{secrets.token_hex(8)}.so"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        through_fd = f"/proc/self/fd/{dir_fd}"
        base = through_fd if os.path.isdir(through_fd) else str(directory)
        return ctypes.CDLL(os.path.join(base, name))
    finally:
        remove(dir_fd, name)


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
    dir_fd, directory, private = open_cache()
    errors: list[str] = []
    try:
        for flags, name in _candidates(compiler, extra, source):
            cached = verified(dir_fd, name)
            for data in [cached, None] if cached is not None else [None]:  # a cached one that fails: rebuilt
                try:
                    if data is None:
                        data = _compile(compiler, flags, source)
                        publish(dir_fd, name, data)
                    return _bind(_dlopen(dir_fd, directory, data))
                except (OSError, subprocess.SubprocessError, AttributeError) as err:
                    if _describe(err) not in errors:
                        errors.append(_describe(err))
                    remove(dir_fd, name, name + ".sha256")
    finally:
        os.close(dir_fd)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    raise NativeUnavailable(f"building or loading the kernels failed ({'; '.join(errors)})", "build failed")
