"""Pass base class, its result and context types, and the pass registry."""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import onnx_ir as ir

from onnxopt.options import field_default, option_text, validate_options

if TYPE_CHECKING:
    from onnxopt.data import FeedSource

logger = logging.getLogger(__name__)

#: Built-in catalog, imported by name so the engine never imports a pass module directly.
BUILTIN_CATALOG = "onnxopt.passes"
#: Entry-point group through which other packages can add passes.
ENTRY_POINT_GROUP = "onnxopt.passes"


@dataclass(frozen=True)
class Tolerance:
    """Allowed deviation of an exact pass: ``|a - b| <= atol * max|ref| + rtol * |ref|``.

    ``atol`` is relative to the magnitude of the reference output so that the same
    tolerance works for logits of size 1 and of size 1000.
    """

    rtol: float = 1e-4
    atol: float = 1e-5


@dataclass(frozen=True)
class Refusal:
    """A rewrite that matched but was not applied, and why."""

    where: str
    reason: str


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        modified: True only if the model was actually changed (computed, not assumed).
        stats: Pass-specific counters and tables, shown in the JSON report.
        refusals: Matches that were declined, with reasons; never silent.
        exact: Overrides the pass's declared exactness for this run (e.g. a lossy threshold).
        summary: One line printed under the report table (e.g. the budget a plan met).
        plan: What the pass would do, as text (printed by ``--dry-run``).
        promised_agreement: Top-1 agreement with the model before the pass that the pass
            promises on new samples, if it states one; the report notes a validation
            measurement below it, with ``promise_caveat`` (what the promise does not cover).
        promise_caveat: See ``promised_agreement``.
    """

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    exact: bool | None = None
    summary: str | None = None
    plan: str | None = None
    promised_agreement: float | None = None
    promise_caveat: str = ""

    def refuse(self, where: str, reason: str) -> None:
        """Record a declined rewrite."""
        logger.info("refused at %s: %s", where, reason)
        self.refusals.append(Refusal(where, reason))


@dataclass
class PassContext:
    """Read-only inputs a pass may use.

    Attributes:
        calib: Calibration feeds, or None when the user gave none.
        input_shapes: Concrete shapes for dynamic inputs, from ``--input-shape``.
        seed: Seed for any randomness a pass needs.
        progress: Whether long loops may show a progress bar.
        dry_run: Plan only: a pass that ``supports_dry_run`` reports its plan and leaves
            the model unchanged; exact passes before the first plan run, the others do not
            (nothing is written).
        quality_floor: The :class:`~onnxopt.compare.QualityFloor` the manager will hold a
            lossy pass to (None: no floor), so a pass can aim for it on its own data.
    """

    calib: FeedSource | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    progress: bool = False
    dry_run: bool = False
    quality_floor: Any = None


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


class Pass:
    """Base class of every pass.

    Subclasses set the class attributes and implement :meth:`run`. A pass does not
    write files, print, or validate itself; the :class:`~onnxopt.manager.PassManager`
    does that around it.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    exact: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    #: Fewest calibration samples the pass can work with when it is given data.
    min_samples: ClassVar[int] = 1
    #: With ``ctx.dry_run`` the pass reports its plan and leaves the model unchanged.
    supports_dry_run: ClassVar[bool] = False
    tolerance: ClassVar[Tolerance] = Tolerance()

    def __init__(self, options: Any | None = None, **kwargs: Any) -> None:
        """Take an ``Options`` instance or its fields as keywords.

        Raises:
            TypeError: Both, or an unknown keyword.
            ValueError: A value outside the range or choices its field declares
                (:mod:`onnxopt.options`).
        """
        if options is not None and kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)
        validate_options(self.options)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Rewrite ``model`` in place and say what changed."""
        raise NotImplementedError

    def requires_data(self) -> bool:
        """Whether this instance cannot run safely without calibration data.

        ``needs_data`` by default; a pass whose options allow a data-free mode overrides it.
        """
        return self.needs_data

    def missing_data_message(self) -> str:
        """The one-line error when calibration data is required but not given."""
        return f"pass {self!r} needs calibration data; give --calib DATA"

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != field_default(f)
        }
        args = ",".join(f"{k}={option_text(v)}" for k, v in changed.items())
        return f"{self.name}({args})" if args else self.name


_REGISTRY: dict[str, type[Pass]] = {}
#: Subcommands a pass family adds to the ``onnxopt`` command line (``split``).
_COMMANDS: dict[str, Callable[[list[str]], int]] = {}
_catalog_loaded = False

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator that adds a pass to the registry under ``cls.name``.

    A pass defined again under the same name in ``__main__`` (a notebook cell or script run
    again) replaces the earlier definition, with a warning.

    Raises:
        ValueError: The class has no name, or another module's pass has that name.
        TypeError: ``Options`` is not a dataclass.
    """
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no registry name")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")
    _load_catalog()  # a clash with a built-in pass shows here, not at the next catalog load
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        if not (existing.__module__ == cls.__module__ == "__main__"):
            raise ValueError(f"pass name {cls.name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}")
        # A script or notebook cell defining its pass again (re-run): the new one wins.
        logger.warning("pass %r is defined again in __main__; the new definition replaces "
                       "the old one", cls.name)
    _REGISTRY[cls.name] = cls
    return cls


def _load_catalog() -> None:
    global _catalog_loaded
    if _catalog_loaded:
        return
    _catalog_loaded = True
    importlib.import_module(BUILTIN_CATALOG)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception:  # a broken plug-in must not break the built-in passes
            logger.exception("could not load pass plug-in %s", entry.name)


def register_command(name: str, main: Callable[[list[str]], int]) -> None:
    """Add ``onnxopt NAME ...``: ``main`` gets the arguments after NAME, returns the exit code.

    A pass family that owns a whole workflow (``onnxopt split`` writes early-exit bundles)
    registers its command here, so the engine's CLI dispatches to it without importing it.
    """
    existing = _COMMANDS.get(name)
    if existing is not None and existing is not main:
        raise ValueError(f"command {name!r} is already registered")
    _COMMANDS[name] = main


def registered_commands() -> dict[str, Callable[[list[str]], int]]:
    """The subcommands pass families added, by name."""
    _load_catalog()
    return dict(_COMMANDS)


def get_pass(name: str) -> type[Pass]:
    """Look a pass class up by registry name (KeyError if unknown)."""
    _load_catalog()
    return _REGISTRY[name]


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted by name."""
    _load_catalog()
    return dict(sorted(_REGISTRY.items()))
