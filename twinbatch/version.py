"""The package version, in one place: pyproject.toml reads it, and so does a checkout run with PYTHONPATH=. (which
has no installed metadata to ask)."""

__version__ = "0.1.0"
