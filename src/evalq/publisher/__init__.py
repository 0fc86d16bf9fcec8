"""The Python SDK: `AsyncClient` and the blocking `Client`."""

from .client import Artifact, AsyncClient
from .sync import Client

__all__ = ["Artifact", "AsyncClient", "Client"]
