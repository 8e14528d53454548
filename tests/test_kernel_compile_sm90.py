"""The multi-LoRA kernels compile for sm_90 (H100 / H200) on a machine without a GPU: tests/compile_sm90.py in a
subprocess outside Triton's interpreter (this session's conftest runs kernels interpreted, which checks their
numbers but not that the compiler accepts them). Skipped where Triton has no NVIDIA backend with its ptxas."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _backend_available() -> bool:
    try:
        import triton.backends.nvidia as nv
    except Exception:  # noqa: BLE001 -- no triton, or no NVIDIA backend in this build
        return False
    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.skipif(not _backend_available(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_lora_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "compile_sm90.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    compiled = [line for line in r.stdout.splitlines() if line.startswith("compiled ")]
    assert len(compiled) >= 15, r.stdout


@pytest.mark.skipif(not _backend_available(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_mla_gluon_kernel_compiles_pipelined_for_sm90():
    """kernels/mla_decode_gluon.py compiles for sm_90 at three ring depths, its loop waiting with STAGES - 2 copy
    groups in flight (compile_mla_gluon's checks)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; sys.path.insert(0, sys.argv[1]); import compile_sm90 as c; c.compile_mla_gluon()"
    r = subprocess.run([sys.executable, "-c", code, HERE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    if "skip mla_decode_gluon" in r.stdout:
        pytest.skip("this Triton has no Gluon")
    assert r.stdout.count("compiled _mla_decode_gluon_kernel") == 3, r.stdout
