"""Closing a TCP listener without resetting connections the kernel has already completed.

Closing a listening socket resets every connection still waiting in its accept queue. A client
whose handshake completed just before has already sent its request, and reads a reset: a request
lost although the server never refused it. To close cleanly:

1. :func:`refuse_new_connections` attaches a socket filter that drops new SYNs (Linux), so no
   handshake starts while the handshakes under way still complete; a client that comes later
   has its SYN dropped and, on retrying, finds the port closed: its request was never sent;
2. after a moment for those handshakes, :func:`close_without_reset` takes every queued
   connection, to be served, and closes.

Where socket filters do not exist the listener is emptied and closed all the same; a connection
completed in between may then still be reset.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Protocol

log = logging.getLogger("fpn_serve")

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
    where socket filters are not available."""
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


def close_without_reset(listener: socket.socket) -> list[socket.socket]:
    """Close ``listener`` and return every connection the kernel had completed on it, to be
    served (after :func:`refuse_new_connections`, no other can complete meanwhile)."""
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    try:
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
    finally:
        listener.close()
