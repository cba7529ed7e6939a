"""Family options (``ModelConfig.options``): defaults filled in, misspellings rejected.

Used by the families that take options (``skip-deq``, ``cdeq``, ``opteq``, ``linf``), so that a
checkpoint's ``config.json`` records every family knob that was in force and a misspelt
``--option`` fails instead of being silently ignored.

>>> from models import ModelConfig
>>> resolve_options(ModelConfig(options={"a": 2}), {"a": 1, "b": 0}, "demo").options
{'a': 2, 'b': 0}
>>> resolve_options(ModelConfig(options={"c": 2}), {"a": 1}, "demo")
Traceback (most recent call last):
...
ValueError: unknown option(s) ['c'] for family 'demo'; available: ['a']
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig


def resolve_options(config: ModelConfig, defaults: dict[str, Any], family: str) -> ModelConfig:
    """``config`` with ``defaults`` filled into ``options``; unknown option keys are an error."""
    unknown = set(config.options) - set(defaults)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for family {family!r}; "
            f"available: {sorted(defaults)}"
        )
    return config.replace(options={**defaults, **config.options})
