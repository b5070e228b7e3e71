"""Register baq with transformers' quantizer registry, without importing transformers.

``import baq`` calls :func:`install`. Importing transformers' quantizer registry costs seconds
(it pulls in torch and most of transformers), and ``import baq`` must stay instant, so the
registration waits for transformers: if ``transformers.quantizers.auto`` is already imported it
happens at once, otherwise a one-shot import hook runs it right after that module executes, which
is before any ``from_pretrained`` can look a quantizer up (``modeling_utils`` imports it at its
top). The classes themselves are in :mod:`baq.integrations.transformers_quantizer`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

TARGET = "transformers.quantizers.auto"


def install() -> None:
    """Register now if transformers' registry is loaded, else when it is first imported."""
    if TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def register() -> bool:
    """Register the ``baq`` quantization config and quantizer; False (logged) if it failed.

    A failure never breaks importing transformers: a baq folder then fails to load loudly anyway
    (docs/FORMAT.md, section 3, ``transformers_weights``).
    """
    try:
        from baq.integrations.transformers_quantizer import register as _register

        _register()
        return True
    except Exception as err:  # an incompatible transformers must not break its own import
        log.warning("baq: not registered with transformers (%s: %s)", type(err).__name__, err)
        return False


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of :data:`TARGET` to register after it ran."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot, and the search below must not find us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any):
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        register()

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... of the real loader
        return getattr(self.inner, name)
