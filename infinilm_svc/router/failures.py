"""What can go wrong between the router and a backend: one small hierarchy of transport errors.

The proxy maps each class to an HTTP status, a retry decision and a statistics kind in one table
(`proxy.FAILURES`); nothing else inspects these errors.
"""
from __future__ import annotations


class TransportError(Exception):
    """The exchange with a backend failed below HTTP semantics (no usable answer)."""


class ConnectError(TransportError):
    """The TCP (or TLS) connection to the backend could not be made."""


class ReadTimeout(TransportError):
    """The backend sent nothing for longer than the idle (read) timeout while we were reading."""


class ConnectionBroken(TransportError):
    """The backend closed or reset the connection before its answer was complete."""


class ProtocolError(TransportError):
    """The backend's bytes are not a valid HTTP/1.1 answer (bad framing, smuggling risks)."""


class BackendHung(TransportError):
    """The backend was taken out of rotation (its health checks time out) while this request waited."""


class StreamErrorEvent(TransportError):
    """The backend ended a stream it had begun with an error event of its own."""


__all__ = ["TransportError", "ConnectError", "ReadTimeout", "ConnectionBroken", "ProtocolError", "BackendHung",
           "StreamErrorEvent"]
