"""Errors the store raises; callers turn them into CLI messages or protocol replies."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: the message is written for an administrator to read."""


class NotFound(StoreError):
    """The named domain, mailbox or account does not exist."""


class Conflict(StoreError):
    """The change would duplicate something that exists (address, idNat, DN...)."""


class Invalid(StoreError):
    """The change is refused because of the current state (closed mailbox...)."""
