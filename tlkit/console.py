"""What the terminal shows: TensorFlow's native start-up notices filtered out of stderr, the rest kept.

TensorFlow's C++ code logs through absl before its own log level is read, so TF_CPP_MIN_LOG_LEVEL
does not hide these lines (measured with 2 and 3, TensorFlow 2.21): on every run of every command
a machine without a GPU printed the absl preamble, the oneDNN and CPU-instruction notices, the
"Could not find cuda drivers" note and an E-level "failed call to cuInit" line. They say nothing a
user can act on, and the E line reads like a failure. The `tlkit` command (not tlkit as a library,
not the tests' in-process calls) runs stderr through a pipe and drops those lines only: every other
line, TensorFlow's real warnings and errors included, passes unchanged and in order. On a machine
with an NVIDIA driver the CUDA lines are kept (there they can matter). TLKIT_RAW_STDERR=1 turns the
filter off.

`tlkit features --engine ray` starts TensorFlow in every Ray worker, and Ray forwards the workers'
stderr to this one behind a prefix naming the worker ("(MapWorker(...) pid=123, ip=...) "): those
lines are judged without the prefix, so each worker's notices go and its real lines stay.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading
from pathlib import Path

# Notices every CPU run prints, GPU or not.
_ALWAYS = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                     rb"|I\d{4} [\d:.]+\s+\d+ (port|cpu_feature_guard)\.cc:\d+\] "
                     rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")
# CUDA's probing, noise only where no NVIDIA driver is loaded.
_CUDA = re.compile(rb"^[IWE]\d{4} [\d:.]+\s+\d+ (cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics|"
                   rb"gpu_device|cuda_dnn|cuda_fft|cuda_blas)\.cc:\d+\] ")

# Ray's prefix on a line forwarded from a worker: the actor or task, its pid (and ip off this node),
# in colour when Ray thinks it writes to a terminal.
_RAY_WORKER = re.compile(rb"^(?:\x1b\[\d+m)?\(.*? pid=\d+(?:, ip=[^)]*)?\)(?:\x1b\[0m)? ")

RAW_ENV = "TLKIT_RAW_STDERR"
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
_FLUSH_AFTER_S = 0.2  # a partial line (no newline yet) is passed on after this long without more


def is_noise(line: bytes, gpu_driver: bool) -> bool:
    line = _RAY_WORKER.sub(b"", line, count=1)
    return bool(_ALWAYS.match(line) or (not gpu_driver and _CUDA.match(line)))


def filter_native_stderr() -> None:
    """From now until exit, file descriptor 2 goes through a pipe whose reader drops is_noise lines."""
    if os.environ.get(RAW_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    gpu_driver = NVIDIA_DRIVER.exists()
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def emit(data: bytes) -> None:
        while data:
            data = data[os.write(terminal, data):]

    def pump() -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([read_end], [], [], _FLUSH_AFTER_S if pending else None)
            if not ready:  # a partial line that waits for nothing: show it
                emit(pending)
                pending = b""
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:  # every writer closed fd 2: exit
                break
            *lines, pending = (pending + chunk).split(b"\n")
            emit(b"".join(line + b"\n" for line in lines if not is_noise(line, gpu_driver)))
        if pending and not is_noise(pending, gpu_driver):
            emit(pending)

    thread = threading.Thread(target=pump, name="tlkit-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(terminal, 2)  # the pipe's last writer here gone: the reader drains it and ends
        thread.join(timeout=2)

    atexit.register(restore)
