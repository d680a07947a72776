"""access-gateway: an authenticating reverse proxy with a signed audit log."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
