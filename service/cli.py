"""``fpn-serve``: run the service with uvicorn, one worker per process.

One process serves one device and owns its metrics registry; scale out by running more
replicas (containers, pods), not more workers, so every ``/metrics`` scrape is the whole truth
of one process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
import uvicorn
from pydantic import ValidationError

app = typer.Typer(add_completion=False, help="Serve fixed point network checkpoints over HTTP.")


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
        settings = Settings(**({"model_dir": model_dir} if model_dir is not None else {}))
    except ValidationError as exc:
        typer.echo(f"fpn-serve: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        workers=1,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="on",
        log_level=log_level.lower(),
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(3)


if __name__ == "__main__":  # pragma: no cover
    app()
