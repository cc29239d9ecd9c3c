"""Optional features and the install extra each needs.

The core install is what a device needs to steer a remote cloud. Serving (``serve``),
the embedded GGUF models (``builtin``) and the evaluation (``eval``) bring heavy
dependencies of their own; code that needs one calls `require`, so a missing extra is
one clear error that names it, not an ImportError from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from costeer_sdk.errors import MissingExtraError

__all__ = ["MissingExtraError", "require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise `MissingExtraError` saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the {extra!r} extra ({module} is not installed): "
            f"pip install 'costeer-sdk[{extra}]'"
        ) from exc
