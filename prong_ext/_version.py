"""The version of prong_ext, defined here only: pyproject.toml reads it (dynamic version) and
prong_ext.__version__ re-exports it."""

__version__ = "0.1.0"
