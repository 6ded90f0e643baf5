"""A recipe of three test models with different pipelines, written into a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from testmodels.structures import conv_chain, residual_blocks

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """\
# three models, three pipelines; shared defaults first
out_dir = "out"
eval = "data/digits_eval.npz"
[gates]
min_agreement = 0.5

[[model]]
name = "digits"
path = "models/digits.onnx"
pipeline = "cleanup,fold-bn"

[[model]]
name = "chain"
path = "models/chain.onnx"
pipeline = "fold-bn,{chain_quantize}"
calib = "data/chain.npz"
eval = "data/chain.npz"
gates = {{ min_agreement = {chain_agreement} }}

[[model]]
name = "res"
path = "models/res.onnx"
pipeline = "cleanup,fold-bn,prune(ratio=0.5,round_to=1)"
calib = "data/res.npz"
eval = "random:16"
input_shape = ["input:1x3x16x16"]
"""


def write_random(path: Path, seed: int, count: int = 32) -> None:
    """Random images for the 16x16 test models, as ``.npz``."""
    rng = np.random.default_rng(seed)
    np.savez(path, input=rng.standard_normal((count, 3, 16, 16)).astype(np.float32))


def make_recipe(folder: Path, chain_agreement: float = 0.5,
                chain_quantize: str = "quantize") -> Path:
    """The three-model recipe in ``folder``; returns the recipe's path.

    ``chain_quantize`` is the chain's quantize step: ``quantize(fallback=false)`` keeps
    what int8 gives even below a gate, where the default would keep nodes float to meet it.
    """
    (folder / "models").mkdir(parents=True)
    (folder / "data").mkdir()
    shutil.copy(ROOT / "testmodels" / "digits_resnet.onnx", folder / "models" / "digits.onnx")
    onnx.save(conv_chain(), folder / "models" / "chain.onnx")
    onnx.save(residual_blocks(), folder / "models" / "res.onnx")
    digits = np.load(ROOT / "testmodels" / "digits_eval.npz")
    np.savez(folder / "data" / "digits_eval.npz", input=digits["input"][:64],
             labels=digits["labels"][:64])
    write_random(folder / "data" / "chain.npz", 0)
    write_random(folder / "data" / "res.npz", 1)
    recipe = folder / "onnxopt.toml"
    recipe.write_text(RECIPE.format(chain_agreement=chain_agreement,
                                    chain_quantize=chain_quantize))
    return recipe

