"""The version of endor-ray (one place; the package root and the store manifest read it)."""

__version__ = "0.1.0"
