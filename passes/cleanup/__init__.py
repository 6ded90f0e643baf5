"""The ``cleanup`` family: exact graph hygiene.

- :mod:`.cleanup`: the pass (Identity/Dropout, dead nodes, unused weights, sorting);
- :mod:`.folding`: constant folding through onnxruntime and inlining of constant ``If``.
"""

from __future__ import annotations

from onnxopt.passes.cleanup.cleanup import CleanupOptions, CleanupPass

__all__ = ["CleanupOptions", "CleanupPass"]
