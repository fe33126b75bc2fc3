"""vitlab: pre-train Vision Transformers on one image dataset and fine-tune them on another."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vitlab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
