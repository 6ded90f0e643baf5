"""The ``fuse-resconv`` family: residual and multi-branch conv blocks fused into one Conv.

- :mod:`.fuse_resconv`: the pass (match, check, apply; layer pruning by scale);
- :mod:`.forms`: linear forms over a base tensor and the per-op table that builds them;
- :mod:`.kernel`: conv kernel geometry (merging kernel sizes, the identity kernel).
"""

from __future__ import annotations

from onnxopt.passes.fuse_resconv.fuse_resconv import FuseResConvOptions, FuseResConvPass

__all__ = ["FuseResConvOptions", "FuseResConvPass"]
