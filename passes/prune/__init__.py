"""The ``prune`` family: structured channel pruning with least-squares compensation.

Modules, in the order a pruning plan uses them:

- :mod:`.prune`: the pass (options, plan, budget check, surgery, refit);
- :mod:`.statistics`: calibration statistics per channel group (consumer input systems);
- :mod:`.capture`: a linear consumer's input rows (im2col windows, Gemm/MatMul vectors);
- :mod:`.importance`: the criteria that score channels (thinet, l1, l2, bn, apoz, random);
- :mod:`.compensation`: the consumer refit algebra behind refit-aware scoring;
- :mod:`.channel_cost`: what a kept channel costs (MACs, params) per group;
- :mod:`.budget`: sharing a MACs/params budget across groups (knapsack, uniform);
- :mod:`.sensitivity`: measured output change of thinned groups (knapsack values, checks);
- :mod:`.reconstruct`: the ridge least-squares refit of every consumer of a pruned group.

Channel groups themselves (which tensors are tied, and the surgery that removes channels)
are the engine's :mod:`onnxopt.channels`, shared with ``prune-zero`` and ``dead-layers``.
"""

from __future__ import annotations

from onnxopt.passes.prune.prune import PruneOptions, PrunePass

__all__ = ["PruneOptions", "PrunePass"]
