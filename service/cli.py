"""``fpn-serve``: run the service with uvicorn, one worker per process, HTTP and gRPC in one
event loop.

One process serves one device and owns its metrics registry; scale out by running more
replicas (containers, pods), not more workers, so every ``/metrics`` scrape is the whole truth
of one process.

SIGTERM (or Ctrl+C) drains before stopping (SPEC §9): readiness turns false at once, responses
carry ``Connection: close``, and both listeners stay open for ``FPN_DRAIN_SECONDS`` so that no
keep-alive request races a closing listener; then they close, and everything accepted is
answered (up to ``FPN_GRACEFUL_TIMEOUT``). A second signal stops without waiting for the drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer
import uvicorn
from pydantic import ValidationError

from .listeners import (
    HANDSHAKE_SECONDS,
    close_without_reset,
    duplicate_listeners,
    refuse_new_connections,
)

if TYPE_CHECKING:
    from .app import Drain

log = logging.getLogger("fpn_serve")

LATE_REQUEST_SECONDS = 0.5
"""After the listeners close: how long a connection accepted just before may take to send its
request (it is then answered, with ``Connection: close``) before it is closed unanswered."""


def _drain_of(app: object) -> Drain | None:
    """The :class:`~service.app.Drain` of an app made by ``create_app``; None for any other."""
    state = getattr(app, "state", None)
    return state and state.drain


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain between the first SIGTERM/SIGINT and the listeners' close."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self._drain_started: float | None = None
        self._drain_logged = False
        self._closing_listeners: asyncio.Future[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = _drain_of(self.config.app)
        if self._drain_started is None and self.drain_seconds > 0 and self.started and drain:
            # In a signal handler: only flip flags here; on_tick (every 0.1 s) does the rest.
            self._captured_signals.append(sig)  # re-raised once shut down, as uvicorn does
            self._drain_started = time.monotonic()
            drain.begin()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            if not self._drain_logged:
                self._drain_logged = True
                log.info("draining for %g s before closing the listeners", self.drain_seconds)
            if time.monotonic() - self._drain_started >= self.drain_seconds:
                self.should_exit = True
                # gRPC stops taking calls together with HTTP (in-flight ones finish).
                drain = _drain_of(self.config.app)
                if drain is not None:  # always: the drain began because there is one
                    self._closing_listeners = asyncio.ensure_future(drain.close_listeners())
        return await super().on_tick(counter)

    def _new_connection(self) -> asyncio.Protocol:
        """A connection protocol as uvicorn's listeners make them (``Server.startup``)."""
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, except that after a drain the listeners close first, without
        resetting the connections the kernel completed (:mod:`service.listeners`), and those
        get a moment to deliver their request: uvicorn would close a connection with no request
        yet at once, cutting a request already on its way."""
        if self._drain_started is not None:
            listeners: list[socket.socket] = []  # uvicorn's servers hold any `sockets` too
            for server in self.servers:
                listeners += duplicate_listeners(server.sockets)
                server.close()  # asyncio stops accepting; the duplicates keep the ports open
            if any([refuse_new_connections(listener) for listener in listeners]):
                await asyncio.sleep(HANDSHAKE_SECONDS)  # handshakes under way complete
            accepted = [c for listener in listeners for c in close_without_reset(listener)]
            loop = asyncio.get_running_loop()
            for connection in accepted:
                await loop.connect_accepted_socket(self._new_connection, connection)
            if accepted:
                log.info("served %d connection(s) accepted as the listeners closed", len(accepted))
            deadline = time.monotonic() + LATE_REQUEST_SECONDS
            while time.monotonic() < deadline and any(
                _waiting_for_request(c) for c in self.server_state.connections
            ):
                await asyncio.sleep(0.02)
        await super().shutdown(sockets)


def _waiting_for_request(connection: object) -> bool:
    """An open HTTP connection with no request in progress."""
    cycle = getattr(connection, "cycle", None)
    return cycle is None or cycle.response_complete


app = typer.Typer(
    add_completion=False,
    help="Serve fixed point network checkpoints over HTTP and gRPC (Open Inference Protocol).",
)


@app.command()
def serve(
    model_dir: Path | None = typer.Option(
        None,
        "--model-dir",
        help="Checkpoint directories to serve (default: FPN_MODEL_DIR, "
        "else ./checkpoints or the bundled checkpoints/).",
    ),
    host: str = typer.Option("127.0.0.1", envvar="FPN_HOST", help="Interface to listen on."),
    port: int = typer.Option(8000, envvar="FPN_PORT", help="TCP port."),
    log_level: str = typer.Option("info", envvar="FPN_LOG_LEVEL"),
    access_log: bool = typer.Option(
        False,
        "--access-log/--no-access-log",
        envvar="FPN_ACCESS_LOG",
        help="Log every request (costs throughput; metrics count requests anyway).",
    ),
    graceful_timeout: float = typer.Option(
        30.0, envvar="FPN_GRACEFUL_TIMEOUT", help="Seconds to finish open requests on SIGTERM."
    ),
) -> None:
    """Run the service. Every other setting comes from FPN_* environment variables."""
    from .app import create_app
    from .settings import Settings

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings() if model_dir is None else Settings(model_dir=model_dir)
    except ValidationError as exc:
        typer.echo(f"fpn-serve: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    config = uvicorn.Config(
        create_app(settings, http_host=host, grace_seconds=graceful_timeout, tune_interpreter=True),
        host=host,
        port=port,
        workers=1,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="on",
        log_level=log_level.lower(),
        access_log=access_log,
        # uvicorn annotates an int, but waits any number of seconds (asyncio.wait_for)
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
        server_header=False,
    )
    server = DrainingServer(config, settings.drain_seconds)
    server.run()
    if not server.started:
        raise typer.Exit(3)


if __name__ == "__main__":  # pragma: no cover
    app()
