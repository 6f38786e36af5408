"""The package version, in a module of its own so that writers of records can stamp it without importing all of routesae."""

__version__ = "0.1.0"
