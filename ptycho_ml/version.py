"""The package version: its one home (pyproject.toml reads it from here; bundles and logged models record it)."""

__version__ = "0.1.0"
