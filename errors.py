"""The project's error types, and the one command-line boundary that reports them (exit_code_of).
Bad input (a config value, a data file, a checkpoint) raises an InputError: every command prints its
one-line message, which names what and where, and exits 2.
gpt2.py keeps its own WeightsError (it imports nothing of the project's). Any other exception is a
bug or a failure of the machine (disk full, a dead rank) and keeps its traceback (exit 1).

They subclass ValueError, so code that catches ValueError around a loader keeps working.
"""
import sys

from gpt2 import WeightsError


class InputError(ValueError):
    """Bad input the user can fix; the message says what, where and how."""


class ConfigError(InputError):
    """A config key or value (a YAML file or a --flag), or a combination of them."""


class DataError(InputError):
    """A preference file or one of its records."""


class CheckpointError(InputError):
    """A training checkpoint that cannot be resumed: damaged, or written by another run."""


class TrainingStopped(Exception):
    """The run stopped on purpose (non-finite losses past max_bad_steps): one line, exit 1."""


class Preempted(Exception):
    """SIGTERM/SIGINT: every rank finished its step and saved a checkpoint. Exit 128 + the signal's
    number, as a process ended by that signal (143 for SIGTERM), so schedulers see a preemption."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


BAD_INPUT = (InputError, WeightsError)  # what every command reports in one line with exit 2 (cli.py)


def exit_code_of(main, *args) -> int:
    """Every command's error boundary: main(*args), then its exit code. Bad input: `error: ...`, one
    line, 2. A run stopped on purpose: one line, 1. SIGTERM/SIGINT after a save: one line, 128 +
    the signal. Anything else is a bug or a failure of the machine and keeps its traceback."""
    try:
        main(*args)
        return 0
    except BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
