"""``python -m onnxopt``: the same as the ``onnxopt`` command."""

from __future__ import annotations

import sys

from onnxopt.cli import main

sys.exit(main())
