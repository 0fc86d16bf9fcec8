"""The gateway: the `evalq-gateway` micro service."""

from .refusals import as_request_error
from .service import Gateway

__all__ = ["Gateway", "as_request_error"]
