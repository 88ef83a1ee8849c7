"""The signal handlers of harness/interrupts.py in this process: SIGTERM raises `Stopped`, and a
signal between `hold()` and `release()` waits for `release()` (a worker holds it while Optuna
creates a trial, so no trial is left RUNNING without a heartbeat)."""
import os
import signal
import time

import pytest

from harness.interrupts import Stopped, exit_code, hold, release, stop_cleanly


@pytest.fixture
def handlers():
    restore = stop_cleanly()
    yield
    release()
    restore()


def signal_self(signum) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in this (the main) thread at the next bytecode


def test_sigterm_raises_stopped_with_exit_code_143(handlers):
    with pytest.raises(Stopped) as e:
        signal_self(signal.SIGTERM)
    assert str(e.value) == "stopped by SIGTERM" and exit_code(e.value) == 143


def test_a_held_signal_is_raised_at_release(handlers):
    hold()
    signal_self(signal.SIGTERM)  # nothing raised here
    with pytest.raises(Stopped):
        release()
    release()  # once only


def test_release_without_a_signal_raises_nothing(handlers):
    hold()
    release()
    with pytest.raises(KeyboardInterrupt) as e:
        signal_self(signal.SIGINT)  # no longer held
    assert exit_code(e.value) == 130
