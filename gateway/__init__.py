"""yigong-gateway: shared core used by the hospital and factory nodes."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("yigong-gateway")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
