"""``python -m service``: the same as ``fpn-serve``."""

from .cli import app

app(prog_name="fpn-serve")
