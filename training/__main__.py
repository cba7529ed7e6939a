"""``python -m training ...`` is ``fpn-train ...`` (what ``torchrun -m training`` runs)."""

from .cli import train_app

train_app(prog_name="fpn-train")
