"""Closing a TCP listener without resetting connections the kernel has already completed.

Closing a listening socket resets every connection still waiting in its accept queue. A client
whose handshake completed just before has already sent its request, and reads a reset: a request
lost although the server never refused it. To close cleanly, the listener first shrinks its
backlog so that a single queued connection fills it, hands every queued connection to the server,
then fills the one free place with a connection of its own (the plug), so that no client's
handshake can complete any more; only then does it close, resetting only the plug. A client that
comes later has its SYN dropped and, on retrying, finds the port closed: its request was never
sent.

Linux semantics: the accept queue is full when it holds more than ``backlog`` connections, and a
full queue drops new SYNs (``net.ipv4.tcp_abort_on_overflow=0``, the default).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from typing import Protocol

log = logging.getLogger("fpn_serve")

PLUG_TIMEOUT_SECONDS = 0.05
"""How long the plug waits for its handshake: on loopback it completes at once unless the queue
is full (then its SYN is dropped and it tries again after taking what is queued)."""

MAX_PLUG_TRIES = 50


class _Descriptor(Protocol):
    def fileno(self) -> int: ...


def duplicate_listeners(listeners: Iterable[_Descriptor]) -> list[socket.socket]:
    """Own duplicates of listening sockets (asyncio's ``Server.sockets`` included), so that the
    server may stop watching and close its own descriptors while the listeners stay open."""
    return [socket.socket(fileno=os.dup(listener.fileno())) for listener in listeners]


def close_without_reset(listener: socket.socket) -> list[socket.socket]:
    """Close ``listener`` and return every connection the kernel had completed on it, to be
    served. Only TCP listeners are plugged; others are emptied, then closed."""
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    plug = None
    try:
        if listener.family in (socket.AF_INET, socket.AF_INET6):
            listener.listen(0)  # from now on one queued connection fills the queue
            for _ in range(MAX_PLUG_TRIES):
                accepted += _accept_queued(listener)
                plug = _plug(listener)
                if plug is not None:
                    break
            else:
                log.warning("could not plug the listener; a connection may be reset")
        if plug is None:
            accepted += _accept_queued(listener)
    finally:
        listener.close()
        if plug is not None:
            plug.close()
    return accepted


def _accept_queued(listener: socket.socket) -> list[socket.socket]:
    accepted: list[socket.socket] = []
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError as exc:  # e.g. ECONNABORTED: the client gave up first
            log.debug("accept during close: %s", exc)
            continue
        connection.setblocking(False)
        accepted.append(connection)


def _plug(listener: socket.socket) -> socket.socket | None:
    """A connection of our own in the listener's one free place, or None where the place was
    taken first (a client's connection, to be accepted before trying again)."""
    host, port = listener.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "::1" if listener.family == socket.AF_INET6 else "127.0.0.1"
    plug = socket.socket(listener.family, socket.SOCK_STREAM)
    plug.settimeout(PLUG_TIMEOUT_SECONDS)
    try:
        plug.connect((host, port))
    except OSError:
        plug.close()
        return None
    return plug
