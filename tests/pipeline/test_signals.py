"""StopSignals: Ctrl-C and SIGTERM raised between training steps, held over a step's update."""

from __future__ import annotations

import os
import signal
import time

import pytest

from attnseg.pipeline.errors import Terminated
from attnseg.pipeline.signals import StopSignals


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline
        time.sleep(0.001)


@pytest.mark.usefixtures("default_signal_handlers")
def test_a_signal_inside_a_step_is_raised_as_the_step_ends():
    """Inside `held()` (one step's update, count and log row) a signal waits for the block's
    end; outside it is raised at once; the handlers found are put back."""
    stop = StopSignals()
    stop.install()
    for signum in (signal.SIGINT, signal.SIGTERM):  # else the signals below end the process
        assert signal.getsignal(signum) == stop._received
    for first, second, raised in ((signal.SIGTERM, signal.SIGINT, Terminated),
                                  (signal.SIGINT, signal.SIGTERM, KeyboardInterrupt)):
        done = []
        with pytest.raises(KeyboardInterrupt) as e:
            with stop.held():
                os.kill(os.getpid(), first)
                _wait_for(lambda: stop.pending is not None)  # noted, not raised
                os.kill(os.getpid(), second)
                time.sleep(0.05)
                done.append("the rest of the step")
        assert type(e.value) is raised and done == ["the rest of the step"]  # the first
        assert stop.pending is None
    for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
        with pytest.raises(KeyboardInterrupt) as e:  # outside a step: at once
            os.kill(os.getpid(), signum)
            time.sleep(5)
        assert type(e.value) is raised
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_already_set_is_left_alone(default_signal_handlers):
    """A caller's own handler, or a signal the shell set to be ignored, stays as it is."""
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = StopSignals()
    stop.install()
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is mine
