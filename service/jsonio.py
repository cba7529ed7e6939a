"""Fast JSON: orjson when installed (serialises NaN/Inf as null, parses 3-5x faster), else the
standard library with the same behaviour (non-finite floats become null)."""

from __future__ import annotations

import json
import math
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency of the serve extra
    orjson = None  # type: ignore[assignment]  # the module or nothing: checked before each use

JSONDecodeError: type[Exception] = orjson.JSONDecodeError if orjson else json.JSONDecodeError


def loads(data: bytes) -> Any:
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data, parse_constant=_reject_constant)


def dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
