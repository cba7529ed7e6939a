"""Model families by name, as timm's ``create_model``: ``create_model(config)`` builds
``FAMILIES[config.family]``. A new family registers a builder and its default backprop mode; the
trainer, checkpoint loader and service need no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import ModelConfig
from .implicit import ExplicitClassifier, FixedPointClassifier, ImplicitClassifier


@dataclass(frozen=True)
class FamilySpec:
    name: str
    build: Callable[[ModelConfig], ImplicitClassifier]
    default_backprop: str
    description: str


FAMILIES: dict[str, FamilySpec] = {}


def register_family(name: str, *, default_backprop: str, description: str):
    """Decorator: register ``build(config) -> ImplicitClassifier`` under ``name``."""

    def decorator(build: Callable[[ModelConfig], ImplicitClassifier]):
        if name in FAMILIES:
            raise ValueError(f"family {name!r} is already registered")
        FAMILIES[name] = FamilySpec(name, build, default_backprop, description)
        return build

    return decorator


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; available: {sorted(FAMILIES)}") from None


def create_model(config: ModelConfig) -> ImplicitClassifier:
    """Build an untrained model of ``config.family``."""
    return get_family(config.family).build(config)


@register_family("fpn", default_backprop="jfb", description="Fixed Point Network, JFB-trained")
def _fpn(config: ModelConfig) -> ImplicitClassifier:
    return FixedPointClassifier(config)


@register_family("deq", default_backprop="ift", description="the same model, IFT-trained (DEQ)")
def _deq(config: ModelConfig) -> ImplicitClassifier:
    return FixedPointClassifier(config)


@register_family(
    "explicit",
    default_backprop="unrolled",
    description="explicit twin: T applied arch.depth times, no fixed point",
)
def _explicit(config: ModelConfig) -> ImplicitClassifier:
    return ExplicitClassifier(config)


# The families of the other seeds live in their own modules and register themselves on import
# (at the bottom: each imports ``register_family`` from this module).
from . import cdeq, linf, opteq, skip_deq  # noqa: E402, F401
