"""Stopping a long training run cleanly: Ctrl-C and SIGTERM become exceptions raised between
steps, so the run saves a checkpoint of its last whole step and the same command resumes."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .errors import Terminated


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (`kill`, `timeout`, a scheduler's preemption) during a
    training run: raised at once as KeyboardInterrupt and `Terminated` (the run saves a
    checkpoint and stops), except inside `held()`, whose block is one step's update (and what
    counts and logs it), which that checkpoint must hold whole or not at all: there the first
    signal is raised as the block ends. Only signals left at Python's defaults are taken over
    (a caller's own handler, or a signal the shell set to be ignored, stays as it is), and
    only in the main thread, the one that receives them.

    A SIGTERM sent to the whole process group (`timeout`, a scheduler) also kills the data
    loader's workers, and torch's SIGCHLD handler would then raise "worker killed" in the
    middle of the checkpoint's write, or before the main process has seen its own SIGTERM.
    So while it is installed a worker killed by SIGTERM counts as the run's own SIGTERM, and
    once the run is stopping, workers that exit are left to the loader's shutdown."""

    _DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self):
        self.holding = False
        self.stopping = False
        self.pending: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, default in self._DEFAULTS.items():
            if signal.getsignal(signum) is default:
                self.previous[signum] = default  # before the handler: restore() needs it
                signal.signal(signum, self._received)
        child = signal.getsignal(signal.SIGCHLD)
        if self.previous and callable(child):  # torch's check of the loader's workers
            self.previous[signal.SIGCHLD] = child
            signal.signal(signal.SIGCHLD, self._child_exited)

    def _received(self, signum, frame) -> None:
        self.stopping = True
        if self.holding:
            self.pending = self.pending or signum
        else:
            self._raise(signum)

    def _child_exited(self, signum, frame) -> None:
        if self.stopping:
            return
        try:
            self.previous[signal.SIGCHLD](signum, frame)
        except RuntimeError as e:
            if signal.SIGTERM not in self.previous or \
                    f"killed by signal: {signal.strsignal(signal.SIGTERM)}" not in str(e):
                raise
            self._received(signal.SIGTERM, frame)

    @staticmethod
    def _raise(signum: int):
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    @contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
