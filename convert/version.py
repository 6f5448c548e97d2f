"""The one place the version lives (pyproject reads it without importing the package)."""

__version__ = "0.1.0"
