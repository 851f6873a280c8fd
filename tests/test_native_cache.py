"""The kernel cache's trust rules (issue #17): nothing planted, damaged or foreign is ever loaded; fallbacks say why.

A "planted" library here is a real shared library whose constructor writes a marker file when it is loaded: the marker
staying absent is the proof that ``dlopen`` never ran on it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import lomix_lightning._engine._build as native_build
import lomix_lightning._engine._cache as native_cache
import lomix_lightning._engine.native as native
from lomix_lightning import LoMixLoss

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler: the kernels are not built"
)

PLANTED_C = r"""
#include <stdint.h>
#include <stdio.h>
static void mark(void) __attribute__((constructor));
static void mark(void) { FILE *f = fopen(MARKER, "w"); if (f) { fputs("planted code ran", f); fclose(f); } }
void lomix_groups_forward(const void *g, int64_t n, int64_t a, int64_t b, int32_t t) {}
void lomix_groups_backward(const void *g, int64_t n, int64_t a, int64_t b, int32_t t) {}
int32_t lomix_openmp(void) { return 0; }
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library loaded yet, an empty cache directory (not created), the default compiler and mode."""
    saved = dict(native_build._STATE)
    native_build._STATE.clear()
    for name in ("LOMIX_NATIVE", "CC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOMIX_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    native_build._STATE.clear()
    native_build._STATE.update(saved)


@pytest.fixture(scope="module")
def golden() -> bytes:
    """One real build of the kernels for this module (the first flag set that compiles here)."""
    compiler, extra = native_build._compiler()
    source = native_build._SOURCE.read_bytes()
    for flags, _ in native_build._candidates(compiler, extra, source):
        try:
            return native_build._compile(compiler, flags, source)
        except subprocess.CalledProcessError:
            continue
    pytest.skip("the kernels do not compile here")


@pytest.fixture
def builds(golden, monkeypatch) -> list:
    """Compiling returns the module's build at once; the list records each compilation asked for."""
    calls: list = []
    monkeypatch.setattr(native_build, "_compile", lambda compiler, flags, source: calls.append(flags) or golden)
    return calls


def _compile_c(code: str, out: Path, *defines: str) -> bytes:
    src = out.with_suffix(".c")
    src.write_text(code)
    subprocess.run(
        ["cc" if shutil.which("cc") else "gcc", "-shared", "-fPIC", *defines, "-o", str(out), str(src)], check=True
    )
    return out.read_bytes()


def _planted(tmp_path: Path) -> tuple[bytes, Path]:
    """A library with the kernels' symbols (doing nothing) whose constructor writes a marker; (bytes, marker)."""
    marker = tmp_path / "marker" / "planted-code-ran"
    marker.parent.mkdir(mode=0o777, exist_ok=True)
    marker.parent.chmod(0o777)  # a second uid must be able to write it, were the library loaded
    return _compile_c(PLANTED_C, tmp_path / "planted.so", f'-DMARKER="{marker}"'), marker


def _expected_name() -> str:
    """The cache file name the first (OpenMP) flag set gets on this machine."""
    compiler, extra = native_build._compiler()
    return native_build._candidates(compiler, extra, native_build._SOURCE.read_bytes())[0][1]


def _plant(directory: Path, data: bytes, record: bool = True) -> None:
    """Put ``data`` under the expected name, with a record that matches it (a digest alone proves nothing)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = _expected_name()
    (directory / name).write_bytes(data)
    if record:
        (directory / f"{name}.sha256").write_bytes(native_cache.record(data))


def _loss_is_right() -> None:
    """The loaded kernels give the PyTorch engine's loss and gradients (a wrong library would not)."""
    assert native.engine(torch.device("cpu"), torch.float32, 3, 2) == "native"
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2)]
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    loss, results = LoMixLoss(2, 3), []
    for mode in ("auto", "0"):
        os.environ["LOMIX_NATIVE"] = mode
        leaves = [m.clone().requires_grad_() for m in maps]
        total = loss(leaves, target).total
        total.backward()
        results.append((total.detach(), [leaf.grad for leaf in leaves]))
    del os.environ["LOMIX_NATIVE"]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _load_recording() -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.library()
    return lib, [str(w.message) for w in caught]


def _assert_recorded(directory: Path) -> None:
    """Every library in ``directory`` is 0644 with a 0644 record of its SHA-256 and size; no temporary file left."""
    libraries = sorted(directory.glob("*.so"))
    assert libraries
    for library in libraries:
        data = library.read_bytes()
        record = Path(f"{library}.sha256")
        assert record.read_text() == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"
        assert stat.S_IMODE(library.stat().st_mode) == stat.S_IMODE(record.stat().st_mode) == 0o644
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # no .tmp or .load- leftovers


# ---------------------------------------------------------------- a cache of our own
@needs_cc
def test_a_new_cache_directory_is_private_and_each_library_recorded(fresh):
    lib, messages = _load_recording()
    assert lib is not None and messages == []
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    _assert_recorded(fresh)
    _loss_is_right()


@needs_cc
def test_a_verified_library_is_loaded_not_rebuilt(fresh, golden, builds):
    _plant(fresh, golden)
    built = sorted(fresh.glob("*.so"))
    mtime = built[0].stat().st_mtime_ns
    lib, messages = _load_recording()
    assert lib is not None and messages == [] and builds == []
    assert sorted(fresh.glob("*.so")) == built and built[0].stat().st_mtime_ns == mtime
    _loss_is_right()


# ---------------------------------------------------------------- planted libraries: never loaded
@needs_cc
def test_a_library_planted_in_a_world_writable_directory_is_never_loaded(fresh, tmp_path, builds):
    data, marker = _planted(tmp_path)
    _plant(fresh, data)
    fresh.chmod(0o777)
    lib, messages = _load_recording()
    assert not marker.exists()
    assert lib is not None  # built in a private directory instead
    assert len(messages) == 1 and f"not using the kernel cache directory '{fresh}'" in messages[0]
    assert "writable by group or others (mode 0777)" in messages[0]
    assert (fresh / _expected_name()).read_bytes() == data  # a directory we do not trust is not touched
    _loss_is_right()


@needs_cc
def test_a_library_planted_in_a_directory_of_another_user_is_never_loaded(fresh, tmp_path, builds, monkeypatch):
    data, marker = _planted(tmp_path)
    _plant(fresh, data)
    fresh.chmod(0o755)
    try:
        os.chown(fresh, 65534, -1)  # as root: really another user's directory
    except PermissionError:  # not root: the same, seen from a process that believes it is another uid
        real = os.geteuid()
        monkeypatch.setattr(native_build.os, "geteuid", lambda: real + 1)
    lib, messages = _load_recording()
    assert not marker.exists()
    assert lib is not None
    assert len(messages) == 1 and f"'{fresh}'" in messages[0] and "not by the current user" in messages[0]
    monkeypatch.undo()  # the real uid again, then check the values of the kernels built privately
    _loss_is_right()


@needs_cc
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to switch to a second uid")
def test_a_second_user_never_loads_a_library_planted_in_our_directory(fresh):
    """A process running as uid 65534 meets root's cache directory (mode 0755) holding a library: it is not theirs."""
    shared = Path(tempfile.mkdtemp(prefix="lomix-second-uid-"))  # reachable by uid 65534 (not under tmp_path)
    try:
        shared.chmod(0o755)
        data, marker = _planted(shared)
        cache = shared / "cache"
        _plant(cache, data)
        cache.chmod(0o755)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become the other user, then load the kernels as the library would
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                os.environ["LOMIX_CACHE_DIR"] = str(cache)
                native_build._STATE.clear()
                lib, messages = _load_recording()
                report = f"{lib is not None}|{marker.exists()}|{' / '.join(messages)}"
                os.write(write, report.encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            report = pipe.read()
        os.waitpid(pid, 0)
        loaded, marker_seen, message = report.split("|", 2)
        assert marker_seen == "False" and not marker.exists()
        assert loaded == "True"  # the second user built their own kernels in a private directory
        assert f"not using the kernel cache directory '{cache}'" in message and "owned by uid 0" in message
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ---------------------------------------------------------------- damaged or foreign libraries: rebuilt
@needs_cc
@pytest.mark.parametrize("damage", ["truncated", "foreign", "no record", "group-writable", "symlink"])
def test_a_damaged_or_foreign_library_is_removed_and_rebuilt(fresh, tmp_path, golden, builds, damage):
    _plant(fresh, golden)
    library, good = fresh / _expected_name(), golden
    planted, marker = _planted(tmp_path)
    if damage == "truncated":  # a full disk or a killed copy: loading it used to die with SIGBUS
        library.write_bytes(good[: len(good) // 3])
    elif damage == "foreign":  # loadable, same symbols, wrong code: loading it gave silently wrong losses
        library.write_bytes(planted)
    elif damage == "no record":
        Path(f"{library}.sha256").unlink()
    elif damage == "group-writable":
        library.chmod(0o664)
    else:
        library.unlink()
        (tmp_path / "elsewhere.so").write_bytes(good)
        library.symlink_to(tmp_path / "elsewhere.so")
    lib, messages = _load_recording()
    assert lib is not None and not marker.exists() and len(builds) == 1
    assert len(messages) == 1 and f"removed the cached kernel library '{library.name}'" in messages[0]
    assert library.read_bytes() == good and not library.is_symlink()
    _assert_recorded(fresh)
    _loss_is_right()


@needs_cc
def test_a_recorded_library_without_the_entry_points_is_rebuilt(fresh, tmp_path, builds):
    """The symbol lookup after dlopen is inside the failure handling: an AttributeError there means rebuild."""
    _plant(fresh, _compile_c("int lomix_unrelated(void) { return 1; }", tmp_path / "empty.so"))
    lib, messages = _load_recording()
    assert lib is not None and messages == [] and len(builds) == 1
    _assert_recorded(fresh)
    _loss_is_right()


# ---------------------------------------------------------------- fallbacks: each says why, once
def test_no_compiler_warns_exactly_once(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    maps, target = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)], torch.zeros(2, 8, 8, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert native.library() is None
            assert torch.isfinite(LoMixLoss(2, 3)(maps, target).total)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "using the PyTorch engine" in messages[0], messages
    assert "no C compiler was found" in messages[0]
    assert native.engine(torch.device("cpu"), torch.float32, 3, 2) == "pytorch: no C compiler"


@pytest.mark.parametrize("cc", ["no-such-cc", "no-such-cc -m64", "'unbalanced"])
def test_an_unusable_cc_warns_once_naming_it(fresh, monkeypatch, cc):
    monkeypatch.setenv("CC", cc)
    lib, messages = _load_recording()
    assert lib is None and native.library() is None
    assert len(messages) == 1 and f"CC={cc!r}" in messages[0]


@needs_cc
def test_cc_with_flags_is_a_compiler_and_its_flags(fresh, monkeypatch, builds):
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{Path(compiler).name} -DLOMIX_UNUSED_FLAG=1")
    assert native_build._compiler() == (compiler, ["-DLOMIX_UNUSED_FLAG=1"])
    lib, messages = _load_recording()
    assert lib is not None and messages == [] and builds[0][0] == "-DLOMIX_UNUSED_FLAG=1"
    monkeypatch.delenv("CC")
    assert not (fresh / _expected_name()).exists()  # the flags are part of the cache key
    _loss_is_right()


def test_a_failing_build_warns_once(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    lib, messages = _load_recording()
    assert lib is None and native.library() is None
    assert (
        len(messages) == 1
        and "building or loading the kernels failed (the compiler exited with status 1)" in (messages[0])
    )


def test_force_fails_loudly_and_a_bad_mode_is_refused(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("LOMIX_NATIVE", "1")
    maps, target = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)], torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(
        RuntimeError, match=r"LOMIX_NATIVE=1 but the native CPU kernels cannot be used: CC='no-such-cc'"
    ):
        LoMixLoss(2, 3)(maps, target)
    monkeypatch.setenv("LOMIX_NATIVE", "sometimes")
    with pytest.raises(ValueError, match="LOMIX_NATIVE must be 0 \\(off\\), 1 .* or auto, got 'sometimes'"):
        native.library()
    monkeypatch.setenv("LOMIX_NATIVE", "0")  # off: no attempt, no warning
    lib, messages = _load_recording()
    assert lib is None and messages == []
    assert native.engine(torch.device("cpu"), torch.float32, 3, 2) == "pytorch: LOMIX_NATIVE=0"


def test_maps_the_kernels_do_not_take_are_logged_once_as_info(fresh, caplog):
    caplog.set_level("INFO", logger="lomix_lightning._engine.native")
    maps = [torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 8, 8, dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # legitimate: not a warning
        for _ in range(2):
            LoMixLoss(2, 3)(maps, torch.zeros(1, 8, 8, dtype=torch.long))
    assert [r.getMessage() for r in caplog.records] == [
        "lomix_lightning: the loss runs on the PyTorch engine for float64 maps (the kernels take float32)"
    ]
    assert native.engine(torch.device("cpu"), torch.float32, 33, 2) == (
        "pytorch: 33 classes (the kernels take at most 32)"
    )


# ---------------------------------------------------------------- where the cache lives
def test_an_unwritable_cache_falls_back_to_a_per_user_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("LOMIX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    first, second = native_cache._cache_candidates()
    assert first == tmp_path / "home-cache" / "lomix_lightning"
    assert second == tmp_path / "tmp" / f"lomix_lightning-{os.geteuid()}"
    (tmp_path / "home-cache").write_text("a file where a directory should be")  # the first cannot be created
    fd, path, private = native_cache.open_cache()
    os.close(fd)
    assert path == second and private is None and stat.S_IMODE(second.stat().st_mode) == 0o700


def test_a_temporary_directory_made_by_someone_else_is_refused_for_a_private_one(monkeypatch, tmp_path):
    monkeypatch.delenv("LOMIX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    squatted = tmp_path / "tmp" / f"lomix_lightning-{os.geteuid()}"
    squatted.mkdir(parents=True)
    squatted.chmod(0o777)  # created first by another user, open to all
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache directory '{squatted}'"):
        fd, path, private = native_cache.open_cache()
    os.close(fd)
    assert private is not None and path == Path(private) and path != squatted
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    shutil.rmtree(private)
