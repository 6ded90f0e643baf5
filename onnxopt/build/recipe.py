"""The ``onnxopt.toml`` recipe: models with their pipelines, data, shapes and gates."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.errors import UserError

#: Keys an entry may set (and the top of the recipe, as defaults for every entry).
ENTRY_KEYS = ("pipeline", "calib", "eval", "input_shape", "gates", "batch_size",
              "max_samples", "seed", "cast_inputs")
#: Keys only an entry may set.
OWN_KEYS = ("name", "path", "output", "report")
#: Keys only the top of the recipe may set.
TOP_KEYS = ("out_dir", "model")
#: Gates and their types (the command line's --min-agreement, ... without the dashes).
GATE_KEYS: dict[str, tuple[type, ...]] = {
    "min_agreement": (float, int), "max_accuracy_drop": (float, int),
    "min_sqnr": (float, int), "quality_floor": (bool,), "strict": (bool,),
}
DEFAULT_PIPELINE = "cleanup,fold-bn"


class RecipeError(UserError):
    """A recipe that cannot be read or has a wrong key or value (one line, exit 2)."""


@dataclass(frozen=True)
class Entry:
    """One model of the recipe, every path absolute, every default applied.

    Attributes:
        name: Unique name (default: the model file's stem); names the outputs.
        path: The input model.
        pipeline: Pipeline spec in the command line's syntax.
        output: Where the optimized model is written.
        report: Where the JSON report is written.
        calib: Calibration data (a path, or ``random:N``), or None.
        eval: Validation data (a path, or ``random:N``), or None.
        input_shapes: ``--input-shape`` values as ``name:1x3x224x224`` strings.
        gates: Gate name -> value (``GATE_KEYS``).
        batch_size: Validation batch size.
        max_samples: Cap on validation samples.
        seed: Seed for random data and sampling passes.
        cast_inputs: Convert data of any numeric type to the model's input types.
    """

    name: str
    path: Path
    pipeline: str
    output: Path
    report: Path
    calib: str | None = None
    eval: str | None = None
    input_shapes: tuple[str, ...] = ()
    gates: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    max_samples: int | None = None
    seed: int = 0
    cast_inputs: bool = False

    def data_paths(self) -> list[Path]:
        """The data files or folders the entry reads (``random:N`` reads none)."""
        return [Path(d) for d in (self.calib, self.eval)
                if d is not None and not d.startswith("random:")]

    def options(self) -> dict[str, Any]:
        """Everything but the paths that decides the result (part of the cache key)."""
        return {"pipeline": self.pipeline, "input_shapes": list(self.input_shapes),
                "gates": dict(sorted(self.gates.items())), "batch_size": self.batch_size,
                "max_samples": self.max_samples, "seed": self.seed,
                "cast_inputs": self.cast_inputs,
                "calib": None if self.calib is None else _data_label(self.calib),
                "eval": None if self.eval is None else _data_label(self.eval)}


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: where it is, where the summary goes, and its entries."""

    path: Path
    out_dir: Path
    entries: tuple[Entry, ...]


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe; every mistake is one :class:`RecipeError` line.

    Raises:
        RecipeError: The file is missing or not TOML, a key is unknown or has the wrong
            type, a path does not exist, or two entries share a name or an output.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise RecipeError("onnxopt build reads recipes with tomllib, which needs Python "
                          "3.11 or later") from None
    recipe_path = Path(path)
    if recipe_path.is_dir():
        recipe_path = recipe_path / "onnxopt.toml"
    if not recipe_path.is_file():
        raise RecipeError(f"no recipe at {recipe_path}")
    try:
        data = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{recipe_path}: not valid TOML: {exc}") from None
    return parse_recipe(data, recipe_path)


def parse_recipe(data: dict[str, Any], recipe_path: Path) -> Recipe:
    """Check a recipe already read from TOML; paths are taken relative to ``recipe_path``."""
    base = recipe_path.resolve().parent
    where = str(recipe_path)
    unknown = sorted(set(data) - set(ENTRY_KEYS) - set(TOP_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} at the top (known: "
                          f"{', '.join(TOP_KEYS + ENTRY_KEYS)})")
    defaults = {k: data[k] for k in ENTRY_KEYS if k in data}
    _check_values(defaults, f"{where}: defaults", base, check_paths=False)
    out_dir = base / _string(data.get("out_dir", "build"), f"{where}: key 'out_dir'")
    models = data.get("model")
    if not isinstance(models, list) or not models or \
            not all(isinstance(m, dict) for m in models):
        raise RecipeError(f"{where}: no models; add at least one [[model]] table with a 'path'")
    entries: list[Entry] = []
    for index, raw in enumerate(models, 1):
        entries.append(_entry(raw, index, defaults, base, out_dir, where))
    _check_unique(entries, where)
    return Recipe(recipe_path, out_dir, tuple(entries))


def _entry(raw: dict[str, Any], index: int, defaults: dict[str, Any], base: Path,
           out_dir: Path, where: str) -> Entry:
    label = f"{where}: model {raw['name']!r}" if isinstance(raw.get("name"), str) \
        else f"{where}: model #{index}"
    unknown = sorted(set(raw) - set(ENTRY_KEYS) - set(OWN_KEYS))
    if unknown:
        raise RecipeError(f"{label}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(OWN_KEYS + ENTRY_KEYS)})")
    if "path" not in raw:
        raise RecipeError(f"{label}: missing key 'path' (the model to build)")
    model = base / _string(raw["path"], f"{label}: key 'path'")
    if not model.is_file():
        raise RecipeError(f"{label}: key 'path': no model file at {model}")
    name = _string(raw.get("name", model.name.removesuffix(".onnx")), f"{label}: key 'name'")
    label = f"{where}: model {name!r}"
    values = {**defaults, **{k: raw[k] for k in ENTRY_KEYS if k in raw}}
    if "gates" in defaults and "gates" in raw:  # gates merge key by key
        values["gates"] = {**defaults["gates"], **raw["gates"]}
    _check_values(values, label, base, check_paths=True)
    output = base / _string(raw["output"], f"{label}: key 'output'") if "output" in raw \
        else out_dir / f"{name}.opt.onnx"
    report = base / _string(raw["report"], f"{label}: key 'report'") if "report" in raw \
        else output.with_name(output.name.removesuffix(".onnx") + ".report.json")
    return Entry(
        name=name, path=model, pipeline=values.get("pipeline", DEFAULT_PIPELINE),
        output=output, report=report,
        calib=_data(values.get("calib"), base), eval=_data(values.get("eval"), base),
        input_shapes=tuple(values.get("input_shape", ())), gates=dict(values.get("gates", {})),
        batch_size=values.get("batch_size", 32), max_samples=values.get("max_samples"),
        seed=values.get("seed", 0), cast_inputs=values.get("cast_inputs", False))


def _check_values(values: dict[str, Any], label: str, base: Path, *, check_paths: bool) -> None:
    """Type checks of the shared keys, and the pipeline and shapes parsed as the CLI does."""
    from onnxopt.data import parse_input_shapes
    from onnxopt.pipeline import parse_pipeline

    if "pipeline" in values:
        spec = _string(values["pipeline"], f"{label}: key 'pipeline'")
        try:
            parse_pipeline(spec)
        except UserError as exc:
            raise RecipeError(f"{label}: key 'pipeline': {exc}") from None
    for key in ("calib", "eval"):
        if key in values:
            text = _string(values[key], f"{label}: key {key!r}")
            if check_paths and not text.startswith("random:") and not (base / text).exists():
                raise RecipeError(f"{label}: key {key!r}: no data at {base / text}")
    if "input_shape" in values:
        shapes = values["input_shape"]
        if isinstance(shapes, str):
            shapes = values["input_shape"] = [shapes]
        if not isinstance(shapes, list) or not all(isinstance(s, str) for s in shapes):
            raise RecipeError(f"{label}: key 'input_shape': expected a list of "
                              f"'name:1x3x224x224' strings")
        try:
            parse_input_shapes(shapes)
        except UserError as exc:
            raise RecipeError(f"{label}: key 'input_shape': {exc}") from None
    for key, kind, low in (("batch_size", int, 1), ("max_samples", int, 1), ("seed", int, 0)):
        if key in values and (not isinstance(values[key], kind) or isinstance(values[key], bool)
                              or values[key] < low):
            raise RecipeError(f"{label}: key {key!r}: expected an integer >= {low}, "
                              f"got {values[key]!r}")
    if "cast_inputs" in values and not isinstance(values["cast_inputs"], bool):
        raise RecipeError(f"{label}: key 'cast_inputs': expected true or false")
    if "gates" in values:
        _check_gates(values["gates"], label)


def _check_gates(gates: Any, label: str) -> None:
    if not isinstance(gates, dict):
        raise RecipeError(f"{label}: key 'gates': expected a table such as "
                          f"{{ min_agreement = 0.99 }}")
    for key, value in gates.items():
        kinds = GATE_KEYS.get(key)
        if kinds is None:
            raise RecipeError(f"{label}: key 'gates.{key}': unknown gate (known: "
                              f"{', '.join(GATE_KEYS)})")
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise RecipeError(f"{label}: key 'gates.{key}': expected "
                              f"{'true or false' if bool in kinds else 'a number'}, "
                              f"got {value!r}")
        if key in ("min_agreement", "max_accuracy_drop") and not 0.0 <= value <= 1.0:
            raise RecipeError(f"{label}: key 'gates.{key}': must be a fraction between 0 "
                              f"and 1, got {value}")


def _check_unique(entries: list[Entry], where: str) -> None:
    seen: dict[Any, str] = {}
    for entry in entries:
        for kind, value in (("name", entry.name), ("output", entry.output),
                            ("report", entry.report)):
            key = (kind if kind == "name" else "file", value)
            if key in seen:
                raise RecipeError(f"{where}: model {entry.name!r}: key {kind!r}: {value} is "
                                  f"also used by model {seen[key]!r}")
            seen[key] = entry.name
        if entry.output.resolve() == entry.path.resolve():
            raise RecipeError(f"{where}: model {entry.name!r}: key 'output': would overwrite "
                              f"the input model")


def _string(value: Any, label: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{label}: expected a non-empty string, got {value!r}")
    return value


def _data(value: str | None, base: Path) -> str | None:
    if value is None or value.startswith("random:"):
        return value
    return str(base / value)


def _data_label(value: str) -> str:
    """Data named by content, not place: the key hashes the bytes, not the path."""
    return value if value.startswith("random:") else "file"
