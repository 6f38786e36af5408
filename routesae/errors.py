"""Errors that mean "the user asked for something we cannot do" (as opposed to bugs).

The CLI turns these into a one- or two-line message and exit code 2, without a traceback;
the Python API lets them propagate so callers can catch them.
"""


class RouteSAEError(ValueError):
    """A problem with the user's input or environment, with a message that says what to do."""


class ConfigError(RouteSAEError):
    """A configuration value is invalid."""


class PluginError(RouteSAEError):
    """A plugin could not be loaded or registered something invalid."""
