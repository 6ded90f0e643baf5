"""The ``cleanup`` family: exact graph hygiene.

- :mod:`.cleanup`: the pass (Identity/Dropout, dead nodes, unused weights, sorting);
- :mod:`.weights`: Constant nodes lifted to initializers, and which values are weights;
- :mod:`.folding`: constant folding through onnxruntime and inlining of constant ``If``;
- :mod:`.shapes`: shape values folded where static dims determine them;
- :mod:`.activations`: a hard swish written out as arithmetic made one activation;
- :mod:`.affine`: per-channel scales and shifts folded into the op before them;
- :mod:`.slices`: consecutive Slices over different axes merged;
- :mod:`.cse`: nodes that compute the same thing merged.
"""

from __future__ import annotations

from onnxopt.passes.cleanup.cleanup import CleanupOptions, CleanupPass

__all__ = ["CleanupOptions", "CleanupPass"]
