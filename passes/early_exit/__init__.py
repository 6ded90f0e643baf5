"""The ``early-exit`` family: split a model at cut points and let easy inputs stop early.

Public API (the runner of the bundles ``onnxopt split`` writes)::

    from onnxopt.passes.early_exit import EarlyExitModel
    result = EarlyExitModel("model.bundle")(feeds)   # outputs and the exit each sample took

Modules:

- :mod:`.early_exit`: the pass (single-file form: later stages inside ``If`` branches, run
  only on the samples no exit took);
- :mod:`.cuts`: cut points (dominators of the graph output) and their MACs;
- :mod:`.heads`: exit heads (pooling, ridge/logistic fit, calibrated margin);
- :mod:`.exits`: exit heads, plans, features and the per-exit report;
- :mod:`.planning`: fitting heads, choosing the exits worth their cost, setting the level;
- :mod:`.guarantee`: the level with a promise on new samples (conformal risk control,
  Learn-then-Test);
- :mod:`.bundle`: the bundle folder format (stage and head models, ``manifest.json``);
- :mod:`.runner`: :class:`EarlyExitModel`, which runs a bundle in batches;
- :mod:`.cli`: the ``onnxopt split`` command.
"""

from __future__ import annotations

from onnxopt.passes.early_exit import cli as _cli  # noqa: F401  (registers 'onnxopt split')
from onnxopt.passes.early_exit.bundle import read_manifest, write_bundle
from onnxopt.passes.early_exit.early_exit import EarlyExitOptions, EarlyExitPass
from onnxopt.passes.early_exit.runner import EarlyExitModel, EarlyExitResult

__all__ = ["EarlyExitModel", "EarlyExitOptions", "EarlyExitPass", "EarlyExitResult",
           "read_manifest", "write_bundle"]
