"""The one kind of error a user can cause, and the line the command line prints for it.

Every module raises its own kind (ConfigError, DatasetError, StudyError, ...), each a HarnessError
whose message is one line naming the problem and the fix; `harness` catches HarnessError alone,
prints `harness: error: <message>` and exits 2. Anything else is a bug, and shows its traceback.
"""


class HarnessError(Exception):
    """Bad input, or something missing that the user can supply: one line, the problem and the fix."""
