"""Closing a listener (SPEC §9 drain): connections the kernel completed before the close are
handed to the server with their requests, not reset; later ones are refused before sending."""

from __future__ import annotations

import socket
import sys

import pytest

from service.listeners import close_without_reset, refuse_new_connections

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    return sock


def queued_clients(listener: socket.socket, count: int) -> list[socket.socket]:
    """Clients whose handshake the kernel completed and whose request is sent, none accepted."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname(), timeout=5)
        client.sendall(REQUEST)
        clients.append(client)
    return clients


def test_a_plain_close_resets_queued_connections(listener: socket.socket) -> None:
    """The race this module exists for (so that the test below can fail)."""
    clients = queued_clients(listener, 3)
    listener.close()
    for client in clients:
        with pytest.raises(ConnectionResetError):
            client.recv(1)


def test_queued_connections_are_handed_over_with_their_requests(listener: socket.socket) -> None:
    clients = queued_clients(listener, 5)
    accepted = close_without_reset(listener)
    assert len(accepted) == len(clients)
    for connection in accepted:
        connection.setblocking(True)
        assert connection.recv(len(REQUEST), socket.MSG_WAITALL) == REQUEST
    # Each client is still connected: what the server answers reaches it.
    by_peer = {c.getpeername(): c for c in accepted}
    for client in clients:
        by_peer[client.getsockname()].sendall(b"HTTP/1.1 200 OK\r\n")
        assert client.recv(64) == b"HTTP/1.1 200 OK\r\n"
    for sock in accepted + clients:
        sock.close()


def test_after_the_close_new_connections_are_refused(listener: socket.socket) -> None:
    address = listener.getsockname()
    assert close_without_reset(listener) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters are Linux's")
def test_refusing_new_connections_drops_syns_and_keeps_the_queue(listener: socket.socket) -> None:
    """After refuse_new_connections no handshake completes (a full accept queue or a reset would
    both be detectable: the client just waits), while queued connections are still handed over."""
    clients = queued_clients(listener, 3)
    assert refuse_new_connections(listener)
    late = socket.socket()
    late.settimeout(0.3)
    with pytest.raises(TimeoutError):  # its SYN is dropped: it would retry, then be refused
        late.connect(listener.getsockname())
    late.close()
    accepted = close_without_reset(listener)
    assert len(accepted) == len(clients)
    for sock in accepted + clients:
        sock.close()
