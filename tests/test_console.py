"""The `tlkit` command's stderr: TensorFlow's start-up notices dropped, every other line kept in order."""

from __future__ import annotations

import subprocess
import sys

from tlkit import console

# Lines TensorFlow 2.21 printed on every run here (no GPU), TF_CPP_MIN_LOG_LEVEL=2 or not.
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796224820.045884   21422 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders. "
    b"To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    b"I0000 00:00:1796223211.348758   29433 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    b"available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.",
]
CUDA = [
    b"I0000 00:00:1796224820.046188   21422 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    b"not be used.",
    b"E0000 00:00:1796224830.316669   21422 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    b"call to cuInit: UNKNOWN ERROR (303)",
]
REAL = [
    b"W0000 00:00:1796224830.316669   21422 op_level_cost_estimator.cc:699] Error in PredictCost() for the op",
    b"E0000 00:00:1796224830.316669   21422 gpu_device.cc:2000] something on a GPU machine",
    b"Traceback (most recent call last):",
    b"UserWarning: a real Python warning",
]


def test_only_the_start_up_notices_are_noise():
    for line in NOISE:
        assert console.is_noise(line, gpu_driver=False) and console.is_noise(line, gpu_driver=True)
    for line in CUDA:
        assert console.is_noise(line, gpu_driver=False) and not console.is_noise(line, gpu_driver=True)
    for line in REAL[:1] + REAL[2:]:
        assert not console.is_noise(line, gpu_driver=False)


def test_a_ray_workers_lines_are_judged_without_rays_prefix():
    # As Ray 2.60 forwarded them from `tlkit features --engine ray`'s actors (colour codes included).
    for prefix in (b"\x1b[36m(MapWorker(MapBatches(BaseWorker)) pid=2661)\x1b[0m ",
                   b"(MapWorker(MapBatches(BaseWorker)) pid=2661, ip=10.0.0.7) "):
        for line in NOISE:
            assert console.is_noise(prefix + line, gpu_driver=True)
        assert console.is_noise(prefix + CUDA[0] + b"\x1b[32m [repeated 2x across cluster]\x1b[0m", gpu_driver=False)
        for line in REAL[:1] + REAL[2:]:
            assert not console.is_noise(prefix + line, gpu_driver=False)


def test_the_filter_drops_the_notices_and_keeps_the_rest_in_order(tmp_path):
    """In a process of its own, as the `tlkit` command installs it: native writes to fd 2, Python's
    sys.stderr, a partial last line, and a child process inheriting fd 2."""
    child = tmp_path / "child.py"
    child.write_text(f"import os\nos.write(2, {CUDA[0]!r} + b'\\n' + b'child line\\n')\n")
    script = tmp_path / "emit.py"
    lines = [NOISE[0], REAL[0], CUDA[1], NOISE[3], REAL[2]]
    script.write_text(
        "import os, subprocess, sys\n"
        "from tlkit import console\n"
        "console.filter_native_stderr()\n"
        f"for line in {lines!r}:\n"
        "    os.write(2, line + b'\\n')\n"
        "sys.stderr.write('UserWarning: a real Python warning\\n')\n"
        f"subprocess.run([sys.executable, {str(child)!r}])\n"
        "sys.stderr.write('last words without a newline')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    got = done.stderr.decode().splitlines()
    # A GPU machine keeps the CUDA lines (they say which device runs), in their places; elsewhere they go.
    kept = (lambda line: [line.decode()]) if console.NVIDIA_DRIVER.exists() else (lambda line: [])
    assert got == [REAL[0].decode(), *kept(CUDA[1]), REAL[2].decode(), "UserWarning: a real Python warning",
                   *kept(CUDA[0]), "child line", "last words without a newline"]


def test_tlkit_raw_stderr_turns_it_off(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; from tlkit import console; "
                           "console.filter_native_stderr(); os.write(2, b'WARNING: All log messages before "
                           "absl::InitializeLog() is called are written to STDERR\\n')"],
                          capture_output=True, timeout=60, env={**__import__("os").environ, console.RAW_ENV: "1"})
    assert b"absl::InitializeLog" in done.stderr
