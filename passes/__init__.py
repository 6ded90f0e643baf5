"""The pass catalog: importing this package registers every built-in pass.

Every module in this package is one pass family and registers its passes with
``onnxopt.register_pass`` when imported. Modules whose name starts with ``_`` hold
shared catalog-private helpers and register nothing.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
