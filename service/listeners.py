"""Closing a TCP listener without resetting connections the kernel has already completed.

Closing a listening socket resets every connection still waiting in its accept queue. A client
whose handshake completed just before has already sent its request, and reads a reset: a request
lost although the server never refused it. To close cleanly:

1. :func:`refuse_new_connections` attaches a socket filter that drops new SYNs (Linux), so no
   handshake starts while the handshakes under way still complete; a client that comes later
   has its SYN dropped and, on retrying, finds the port closed: its request was never sent;
2. after a moment for those handshakes, :func:`close_without_reset` takes every queued
   connection, to be served, and closes.

Without socket filters, :func:`close_without_reset` shrinks the backlog so that one queued
connection fills it and fills the last place with a connection of its own (the plug), so that
no further handshake completes (a full queue drops SYNs); one started just before the plug may
still be cut, which the filter avoids.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Protocol

log = logging.getLogger("fpn_serve")

PLUG_TIMEOUT_SECONDS = 0.05
"""How long the plug waits for its handshake: on loopback it completes at once unless the queue
is full (then its SYN is dropped and it tries again after taking what is queued)."""

MAX_PLUG_TRIES = 50

HANDSHAKE_SECONDS = 0.05
"""After :func:`refuse_new_connections`: how long the handshakes under way get to complete (on
loopback or a LAN they take well under a millisecond; the kernel answers them, not the app)."""

TCP = (socket.AF_INET, socket.AF_INET6)


class _Descriptor(Protocol):
    def fileno(self) -> int: ...


def duplicate_listeners(listeners: Iterable[_Descriptor]) -> list[socket.socket]:
    """Own duplicates of listening sockets (asyncio's ``Server.sockets`` included), so that the
    server may stop watching and close its own descriptors while the listeners stay open."""
    return [socket.socket(fileno=os.dup(listener.fileno())) for listener in listeners]


SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
DROP_SYN = (  # classic BPF over the TCP header: drop a segment with SYN and without ACK
    (0x30, 0, 0, 13),  # ldb [13]            the flags byte
    (0x45, 0, 2, 0x02),  # jset #SYN, next, accept
    (0x45, 1, 0, 0x10),  # jset #ACK, accept, drop
    (0x06, 0, 0, 0),  # drop: ret #0
    (0x06, 0, 0, 0xFFFFFFFF),  # accept: ret #-1
)


def refuse_new_connections(listener: socket.socket) -> bool:
    """Drop new SYNs at ``listener`` from now on; handshakes under way still complete. False
    where socket filters are not available (then :func:`close_without_reset` plugs)."""
    if not sys.platform.startswith("linux") or listener.family not in TCP:
        return False
    program = b"".join(struct.pack("HBBI", *instruction) for instruction in DROP_SYN)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(DROP_SYN), ctypes.addressof(buffer))
    try:
        listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("no socket filter on the listener: %s", exc)
        return False
    return True


def close_without_reset(listener: socket.socket, *, plug: bool = True) -> list[socket.socket]:
    """Close ``listener`` and return every connection the kernel had completed on it, to be
    served. ``plug``: fill the queue first (TCP listeners only; not needed, and not possible,
    once :func:`refuse_new_connections` holds)."""
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    plug_socket = None
    try:
        if plug and listener.family in TCP:
            listener.listen(0)  # from now on one queued connection fills the queue
            for _ in range(MAX_PLUG_TRIES):
                accepted += _accept_queued(listener)
                plug_socket = _plug(listener)
                if plug_socket is not None:
                    break
            else:
                log.warning("could not plug the listener; a connection may be reset")
        if plug_socket is None:
            accepted += _accept_queued(listener)
    finally:
        listener.close()
        if plug_socket is not None:
            plug_socket.close()
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
