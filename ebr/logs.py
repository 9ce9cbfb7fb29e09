"""Logging of every command: one format, warnings kept, known noise dropped.

`setup()` is called once by each entry point (`ebr`, `python -m trainer.task`) before work starts.
Two sources flood a CPU machine's output with lines that say nothing about the run:
  * Apache Beam logs every shard it writes and every bundle it runs at INFO
    (`apache_beam.io.filebasedsink`, `apache_beam.io.iobase`, ...): its loggers are raised to
    WARNING, so its warnings and errors still show.
  * TensorFlow's C++ runtime probes for CUDA in every process that imports it and reports the
    failure as an error ("failed call to cuInit"), which no log level removes without also
    removing real errors (upstream's answer is the `tensorflow-cpu` wheel, which `scann[tf]`
    does not accept beside `tensorflow`). Those exact lines are filtered from file descriptor 2
    by a reader thread; every other byte passes through unchanged, and a crash report
    (`faulthandler`) bypasses the filter so it cannot be lost with the thread.
`--verbose` (or `EBR_LOG_NOISE=1`) turns both off.
"""
from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import re
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("apache_beam",)
# TensorFlow's CUDA probe on a machine without a GPU driver (TF 2.20 wording).
NOISE = re.compile(rb"(failed call to cuInit|Could not find cuda drivers on your machine|"
                   rb"Unable to register cu(DNN|FFT|BLAS) factory|"
                   rb"computation placer already registered)")

_filter: "_StderrFilter | None" = None


class _StderrFilter:
    """Routes fd 2 through a pipe and drops NOISE lines; restored at exit."""

    def __init__(self) -> None:
        self.original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        faulthandler.enable(file=os.fdopen(os.dup(self.original), "w"), all_threads=True)
        self.thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.read, 65536)
            if not chunk:
                break
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            kept = [line for line in lines if not NOISE.search(line)]
            if kept:
                os.write(self.original, b"\n".join(kept) + b"\n")
        if pending and not NOISE.search(pending):
            os.write(self.original, pending)

    def close(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.original, 2)  # the pipe's last writer in this process goes: the pump ends
        self.thread.join(timeout=5)


def setup(verbose: bool = False, filter_native: bool = True) -> None:
    """Logging for a command. `filter_native=False` when the caller does not own the process's
    stderr (a command run in-process by a test or a notebook)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    if verbose or os.environ.get("EBR_LOG_NOISE") == "1":
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    global _filter
    if filter_native and _filter is None and "tensorflow" not in sys.modules:  # the probe runs at TF's import
        _filter = _StderrFilter()
