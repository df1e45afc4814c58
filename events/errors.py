"""Exceptions of the `events` package (one base class)."""

from __future__ import annotations


class EventStoreError(Exception):
    """Base class of every event-store error."""


class ConcurrencyError(EventStoreError):
    """An append named an expected stream version that is no longer current."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, append expected {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class EventDecodeError(EventStoreError):
    """A stored row has an unknown type or data that does not decode."""

    def __init__(self, position: int, event_type: str, reason: str) -> None:
        super().__init__(f"event at position {position} (type {event_type!r}): {reason}")
        self.position = position
        self.event_type = event_type


class StoreClosedError(EventStoreError):
    """The store was used after close()."""
