"""The signal handlers of harness/interrupts.py in this process: SIGTERM raises `Stopped`; a
signal between `hold()` and `release()` waits for `release()` (a worker holds it while Optuna
creates a trial, so no trial is left RUNNING without a heartbeat); a stop Python swallowed is
raised again by `check()`."""

import signal
import subprocess
import sys

import pytest

from harness.interrupts import Stopped, TimeUp, check, exit_code, finishing, hold, release, stop_cleanly


@pytest.fixture
def handlers():
    restore = stop_cleanly()
    yield
    release()
    restore()


def signal_self(signum) -> None:
    signal.raise_signal(signum)  # delivered to this (the main) thread, its handler run before it returns


def test_sigterm_raises_stopped_with_exit_code_143(handlers):
    with pytest.raises(Stopped) as e:
        signal_self(signal.SIGTERM)
    assert str(e.value) == "stopped by SIGTERM" and exit_code(e.value) == 143


def test_sigusr1_raises_time_up_a_stop_with_exit_code_138(handlers):
    """Slurm's warning before a job's time limit (--signal=B:USR1@N): the same clean stop as SIGTERM."""
    with pytest.raises(TimeUp) as e:
        signal_self(signal.SIGUSR1)
    assert isinstance(e.value, Stopped) and exit_code(e.value) == 138
    assert str(e.value) == "stopped by SIGUSR1 (the Slurm job nears its time limit)"


def test_sigusr1_after_the_last_trial_lets_the_summary_finish(handlers, capsys):
    """Past the last trial (`finishing`) the time-limit warning has nothing to stop: it is let pass
    with a line instead of ending the job with 138 and no summary; SIGTERM still stops."""
    with finishing():
        signal_self(signal.SIGUSR1)  # nothing raised
        assert "after the last trial: finishing the summary" in capsys.readouterr().err
        with pytest.raises(Stopped):
            signal_self(signal.SIGTERM)


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


class Swallows:
    def __del__(self):  # where Python prints an exception and goes on ("Exception ignored in")
        signal_self(signal.SIGTERM)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_swallowed_in_a_finalizer_is_raised_by_check(handlers):
    obj = Swallows()
    del obj  # the handler's Stopped is lost here (Python reports it as unraisable)...
    with pytest.raises(Stopped):
        check()  # ...and raised here, once
    check()


def test_check_after_a_stop_that_was_caught_raises_nothing_new_once_handlers_are_restored():
    restore = stop_cleanly()
    with pytest.raises(Stopped):
        signal_self(signal.SIGTERM)
    restore()
    check()  # the stop was delivered; a later run in this process is not stopped by it


SECOND_SIGNAL = """
import itertools, sys
from harness.interrupts import Stopped, stop_cleanly

ticks = itertools.count(step=10.0)  # every signal 10 s after the last: never the same one twice
stop_cleanly(clock=lambda: next(ticks))
print("ready", flush=True)
try:
    sys.stdin.readline()
except Stopped:
    print("stopped", flush=True)  # a clean stop under way (a run ending KILLED) ...
    sys.stdin.readline()  # ... when the second signal comes
print("not ended at once", flush=True)
"""


def test_a_second_signal_ends_the_process_at_once_with_its_exit_code():
    """The first SIGTERM asks for a clean stop; a second one (not the first arriving twice) ends the
    process there and then, exit 143, whatever it was doing."""
    child = subprocess.Popen(
        [sys.executable, "-c", SECOND_SIGNAL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        assert child.stdout.readline() == "stopped\n"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143
        assert child.stdout.read() == ""
    finally:
        child.kill()
        child.wait()


INTERRUPT_IN_EXEC = """
import sys
from harness import cli

command = cli.main


def main_then_an_interrupt_caught_in_exec():
    code = command()  # its imports make dataclasses from text, which would clear the mark: it comes after
    try:
        exec("raise KeyboardInterrupt")  # a Ctrl-C landing in code made from text, caught as a stop is
    except KeyboardInterrupt:
        pass
    return code


cli.main = main_then_an_interrupt_caught_in_exec
sys.argv = ["harness", "tune", "--study", "s", "--space", "no-such-space"]  # a command that ends at once with 2
cli.entry()
"""


def test_under_python_m_the_command_keeps_its_exit_code_after_an_interrupt_caught_in_exec(tmp_path):
    """CPython remembers a KeyboardInterrupt that left a string `exec`, even one caught, and under
    `python -m` ends the process by SIGINT at exit (-2): the SIGINT-stopped study of test_distributed
    then ended -2 instead of 130 about one time in ten. `entry` clears the mark."""
    (tmp_path / "interrupted_in_exec.py").write_text(INTERRUPT_IN_EXEC)
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "harness: error: search space 'no-such-space' not found: pass a YAML file or one of: cnn, fast, training"
    )
