"""Building and loading ``ce_dice.c``: compiled once per machine into a cache directory, loaded with ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("ce_dice.c")
_FLAG_SETS = (  # the first that builds and loads wins
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp"],
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],  # compilers without -march=native
)
_LOCK = threading.Lock()
_STATE: dict = {}


def _cache_dir() -> Path:
    """``$LOMIX_CACHE_DIR``, else the user cache directory, else (not writable) a per-user temporary directory."""
    if os.environ.get("LOMIX_CACHE_DIR"):
        return Path(os.environ["LOMIX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "lomix_lightning"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"lomix_lightning-{user}"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags (a cached build is per CPU)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile ``ce_dice.c`` to ``target`` through a temporary file (atomic: concurrent processes may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = [compiler, *flags, "-fPIC", "-shared", "-std=c99", "-o", tmp, str(_SOURCE), "-lm"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    """Build (once per machine) and load the library; ``None`` with one warning if that is not possible."""
    if os.environ.get("LOMIX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if sys.platform == "win32":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    errors, source, machine, cache = [], _SOURCE.read_bytes(), _cpu_id().encode(), _cache_dir()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(), machine])).hexdigest()
        target = cache / f"ce_dice-{key[:16]}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", b"") or b""
            errors.append(f"{err} {stderr.decode(errors='replace').strip()[:300]}")
            continue
        for name in ("lomix_groups_forward", "lomix_groups_backward"):
            getattr(lib, name).argtypes = [
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int32,
            ]
            getattr(lib, name).restype = None
        lib.lomix_openmp.restype = ctypes.c_int32
        lib.openmp = bool(lib.lomix_openmp())
        return lib
    warnings.warn(
        "lomix_lightning: could not build the native CPU kernels, using the PyTorch implementation (same values, "
        f"slower on the CPU; set LOMIX_NATIVE=0 to skip this attempt): {'; '.join(errors)}",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (switched off, no compiler, or the build failed); built on first call."""
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"] = _load()
        return _STATE["lib"]
