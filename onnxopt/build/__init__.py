"""Build many models from a recipe, cached, on local processes or Ray; sweeps of pipelines."""

from __future__ import annotations

from onnxopt.build.build import BuildOutcome, build
from onnxopt.build.executors import make_executor
from onnxopt.build.recipe import Entry, Recipe, RecipeError, load_recipe

__all__ = ["BuildOutcome", "Entry", "Recipe", "RecipeError", "build", "load_recipe",
           "make_executor"]
