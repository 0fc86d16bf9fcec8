"""The Python SDK: `AsyncClient` and the blocking `Client`."""

from .client import AsyncClient
from .sync import Client

__all__ = ["AsyncClient", "Client"]
