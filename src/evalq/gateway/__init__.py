"""The gateway: the `evalq-gateway` micro service."""

from .service import Gateway, as_request_error

__all__ = ["Gateway", "as_request_error"]
