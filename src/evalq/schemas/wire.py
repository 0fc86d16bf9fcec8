"""The base of every wire Struct: frozen, keyword-only, every field written out."""

from __future__ import annotations

from msgspec import Struct

__all__ = ["Wire"]


class Wire(Struct, frozen=True, kw_only=True, omit_defaults=False):
    pass
