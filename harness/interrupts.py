"""Ctrl-C and SIGTERM: the first asks for a clean stop, a second ends the process at once.

Both raise in the main thread, SIGTERM as `Stopped` and Slurm's SIGUSR1 as `TimeUp`, kinds of
KeyboardInterrupt, so every path that handles Ctrl-C handles them too. `hold()` ... `release()`
brackets steps that must not be cut in two (a signal in between is raised at `release()`);
`check()` raises again a stop that Python swallowed in a weakref callback or a `__del__`. What a
stop does to runs and trials: docs/stopping-and-outages.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138}
DUPLICATE_SECONDS = 1.0
# per process, like the signal handlers themselves: a hold in force, the stop it holds back, and
# the stop asked for (raised once more by `check` if it never reached the code)
_held: dict = {"on": False, "pending": None, "asked": None, "finishing": False}


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by SIGTERM."""


class TimeUp(Stopped):
    """The process was asked to stop by SIGUSR1: its Slurm job nears its time limit."""


def _stop_for(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGTERM:
        return Stopped("stopped by SIGTERM")
    if signum == signal.SIGUSR1:
        return TimeUp("stopped by SIGUSR1 (the Slurm job nears its time limit)")
    return KeyboardInterrupt("interrupted by the user (Ctrl-C)")


def stop_reason(e: KeyboardInterrupt) -> str:
    """Why a run ended KILLED, in one line."""
    return str(e) or "interrupted by the user (Ctrl-C)"


def exit_code(e: KeyboardInterrupt) -> int:
    if isinstance(e, TimeUp):
        return EXIT_CODES[signal.SIGUSR1]
    return EXIT_CODES[signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT]


def stop_cleanly(on_signal=None, clock=time.monotonic):
    """Install the handlers in this process; `on_signal(signum)` runs first on every signal that
    counts (a parent forwards it to its workers there). Returns a function that puts back the
    handlers there were. Outside the main thread (where Python allows no handlers) it does nothing.
    `clock` tells a second signal from the same one arriving twice (within DUPLICATE_SECONDS)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    first: dict = {}

    def handler(signum, frame):
        now = clock()
        if first and now - first["at"] < DUPLICATE_SECONDS:
            return
        if signum == signal.SIGUSR1 and _held["finishing"]:  # nothing left to stop or requeue
            print("harness: SIGUSR1 (time limit near) after the last trial: finishing the summary", file=sys.stderr)
            return
        if on_signal is not None:
            on_signal(signum)
        if first:
            os._exit(EXIT_CODES[signum])
        first["at"] = now
        stop = _stop_for(signum)
        _held["asked"] = stop
        if _held["on"]:
            _held["pending"] = stop
            return
        raise stop

    before = {sig: signal.signal(sig, handler) for sig in EXIT_CODES}
    hook = sys.unraisablehook

    def quiet(unraisable) -> None:  # a stop swallowed by a finalizer: `check` raises it, nothing to print
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and unraisable.exc_value is _held["asked"]):
            hook(unraisable)

    sys.unraisablehook = quiet

    def restore() -> None:
        for sig, old in before.items():
            signal.signal(sig, old)
        sys.unraisablehook = hook
        _held.update(on=False, pending=None, asked=None, finishing=False)

    return restore


@contextlib.contextmanager
def finishing():
    """Past a study's last trial: a SIGUSR1 (a Slurm job near its time limit) is let pass, since
    there is no trial to stop or job to requeue, and the summary being written is seconds of work.
    SIGTERM and Ctrl-C still stop."""
    _held["finishing"] = True
    try:
        yield
    finally:
        _held["finishing"] = False


def hold() -> None:
    """From here a first signal waits for `release()` (the handlers of `stop_cleanly` only)."""
    _held.update(on=True, pending=None)


def release() -> None:
    """End a `hold()`: raise the stop that arrived meanwhile, if one did."""
    stop, _held["pending"] = _held["pending"], None
    _held["on"] = False
    if stop is not None:
        _held["asked"] = None
        raise stop


def forget_interrupt_in_exec() -> None:
    """Keep the exit code a command chose after a Ctrl-C (130). CPython marks the process when a
    KeyboardInterrupt leaves code run from a string (`exec`/`eval` of text: every dataclass and
    namedtuple is made that way, so a Ctrl-C during a lazy import often lands there), even one caught
    later; under `python -m` the interpreter then ends itself by SIGINT at exit (-2, no traceback).
    The mark is cleared at the start of each such `exec`: an empty one, as the last step, clears it."""
    exec("")


def check() -> None:
    """Raise the stop asked for, once, if it has not been raised where it can be caught (see above).

    Called where no stop can be in flight: between epochs and between trials."""
    stop, _held["asked"] = _held["asked"], None
    if stop is not None and not _held["on"]:
        raise stop
