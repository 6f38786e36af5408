"""Errors that mean "the user asked for something we cannot do" (as opposed to bugs).

The CLI turns these into a one- or two-line message and exit code 2, without a traceback (``--debug``
or ``ROUTESAE_DEBUG=1`` prints it, with the error that caused it); the Python API lets them
propagate so callers can catch them. Readers of user input (datasets, model directories,
checkpoints) wrap the third-party call that parses it in :func:`reading`, so whatever that library
raises on bad bytes becomes one message naming the input and the fix.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class RouteSAEError(ValueError):
    """A problem with the user's input or environment, with a message that says what to do."""


class ConfigError(RouteSAEError):
    """A configuration value is invalid."""


class PluginError(RouteSAEError):
    """A plugin could not be loaded or registered something invalid."""


@contextmanager
def reading(what: str, fix: str) -> Iterator[None]:
    """Turn a failure while parsing ``what`` (a file, a model directory) into a :class:`RouteSAEError` saying ``fix``.

    Wrap only the third-party call that parses the input: every error it raises means "this input is
    unreadable", and its own message (first line) says how.
    """
    try:
        yield
    except RouteSAEError:
        raise
    except Exception as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RouteSAEError(f"{what} cannot be read ({type(e).__name__}: {reason[:200]}); {fix}") from e
