"""The CMake build of the AOT-compiled Triton kernel library (C ABI) and its C test driver.

`.ci/run` builds it into build/native before the tests; without that build (a developer's
checkout) the test configures and builds a private copy.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPORTED = {"attnseg_kernels_init", "attnseg_kernels_last_error", "attnseg_kernels_archs",
            "attnseg_class_attention_maps", "attnseg_finalize_masks"}


def _run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def native_build(tmp_path_factory):
    missing = [tool for tool in ("cmake", "cc") if shutil.which(tool) is None]
    if missing:
        why = (f"{' and '.join(missing)} not found: the native kernel library (CMakeLists.txt) "
               "was neither built nor tested; it needs cmake, a C compiler and the CUDA headers")
        if os.environ.get("CI"):  # CI installs them: a missing tool there is a failure
            pytest.fail(why)
        pytest.skip(why)
    build = ROOT / "build" / "native"
    if not (build / "CMakeCache.txt").exists():
        build = tmp_path_factory.mktemp("native")
        _run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"])
    _run(["cmake", "--build", str(build), "-j2"])  # a no-op when .ci/run built it
    return build


def test_library_builds_exports_only_its_api_and_needs_no_libcuda(native_build):
    lib_path = native_build / "libattnseg_kernels.so"
    assert lib_path.is_file()
    # Loads here, where there is no libcuda: the driver is resolved at run time.
    lib = ctypes.CDLL(str(lib_path))
    lib.attnseg_kernels_archs.restype = ctypes.c_char_p
    lib.attnseg_kernels_last_error.restype = ctypes.c_char_p
    assert lib.attnseg_kernels_archs().decode() == "80,90"
    status = lib.attnseg_kernels_init()
    if status != 0:  # no driver on this machine: a clean error, not a crash
        assert status == 1 and b"libcuda" in lib.attnseg_kernels_last_error()
    if shutil.which("nm"):
        out = _run(["nm", "-D", "--defined-only", str(lib_path)])
        symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
        assert symbols == EXPORTED, symbols
    if shutil.which("readelf"):
        needed = _run(["readelf", "-d", str(lib_path)])
        assert "libcuda" not in needed
    # Every architecture's cubins are embedded, and the generated loaders no longer exit().
    generated = sorted((native_build / "aot").glob("*.c"))
    assert {p.stem.rsplit("_", 1)[-1] for p in generated} == {"sm80", "sm90"}
    for p in generated:
        text = p.read_text()
        assert "exit(code)" not in text and "attnseg_record_cuda_error(code)" in text


def test_c_driver_passes(native_build):
    out = _run([str(native_build / "attnseg_kernels_test")])
    assert "cubins for sm 80,90" in out
    assert "GPU check skipped" in out or "all GPU checks passed" in out
