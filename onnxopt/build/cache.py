"""Content-hash cache: an entry is rebuilt only when something that decides its result changed.

The key of an entry hashes the bytes of its input model (and of the external-data files
beside it), the bytes of its data files, its pipeline and options, and the versions of
onnxopt, onnx-ir, onnx and onnxruntime. The key is recorded in the entry's JSON report
next to the sha256 of the model written; an entry is skipped when its report has the same
key and its output still has that sha256. Failed entries record no key: they run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from onnxopt.build.recipe import Entry

logger = logging.getLogger(__name__)

#: Packages whose versions are part of every key.
VERSIONED = ("onnxopt", "onnx-ir", "onnx", "onnxruntime")
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        if path.is_dir():
            digest.update(item.relative_to(path).as_posix().encode() + b"\0")
        with open(item, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Installed versions of the packages that decide a result."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def entry_key(entry: Entry) -> str:
    """The content hash of everything that decides ``entry``'s outputs."""
    parts: dict[str, Any] = {
        "model": file_digest(entry.path),
        "external_data": {p.name: file_digest(p) for p in _external_data(entry.path)},
        "data": {kind: file_digest(Path(value)) for kind, value in
                 (("calib", entry.calib), ("eval", entry.eval))
                 if value is not None and not value.startswith("random:")},
        "options": entry.options(),
        "versions": versions(),
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cached_result(entry: Entry, key: str) -> dict[str, Any] | None:
    """The recorded build of ``entry`` if its key matches and its output is intact."""
    try:
        report = json.loads(entry.report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    build = report.get("build") if isinstance(report, dict) else None
    if not isinstance(build, dict) or build.get("key") != key:
        return None
    if not entry.output.is_file() or file_digest(entry.output) != build.get("output_sha256"):
        logger.info("%s: output missing or changed since it was built; rebuilding", entry.name)
        return None
    return report


def _external_data(model: Path) -> list[Path]:
    """Files a model keeps its weights in (ONNX external data), found without loading them."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # unreadable: the build reports it; the key needs only the bytes
        return []
    names = set()
    for tensor in _tensors(proto.graph):
        for item in tensor.external_data:
            if item.key == "location":
                names.add(item.value)
    return [model.parent / name for name in sorted(names) if (model.parent / name).is_file()]


def _tensors(graph: Any) -> list[Any]:
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                found.append(attr.t)
            if attr.HasField("g"):
                found.extend(_tensors(attr.g))
            for sub in attr.graphs:
                found.extend(_tensors(sub))
    return found
