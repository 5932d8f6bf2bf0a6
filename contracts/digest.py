"""One short stable hash for every "same inputs, same result" key of the project (a run's config, a mining cache)."""

from __future__ import annotations

import hashlib
import json


def digest(value: object) -> str:
    """12 hex digits of SHA-256 over ``value`` as sorted-key JSON (values JSON cannot write, by ``str``).

    Example:
        >>> digest({"b": 1, "a": [2]}) == digest({"a": [2], "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]
