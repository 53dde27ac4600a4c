"""lorakit's version (a leaf module: the report writers read it without importing the package)."""

__version__ = "0.1.0"
