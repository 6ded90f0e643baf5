"""Real inputs and task answers for the PP-OCR models: rendered text, preprocessing, decoding.

Inputs are rendered from code with Pillow (a bench extra, never a runtime dependency) and a
seed, so the same seed gives the same arrays; nothing is downloaded. Preprocessing follows
rapidocr 1.4.4 (``config.yaml`` and ``ch_ppocr_*``): pixels ``(x / 255 - 0.5) / 0.5``; the
recognizer takes a crop resized to 48 px height keeping its aspect ratio, right-padded with
zeros to 320 px; the angle classifier the same at 48x192; the detector a page whose sides are
multiples of 32. Pillow's bilinear resize stands in for ``cv2.resize`` (also bilinear).
rapidocr feeds the BGR images cv2 decodes: ``bgr=True`` does the same (the corpus inputs,
``inputs.py``, use it); the sets this script writes keep RGB order, the order the recorded
``ocr_quantize`` results were measured on (the text is near-gray, so the two differ little).
The same renderer serves ``inputs.py``'s OCR generators (:func:`text_lines`,
:func:`text_pages`).

Task answers (what the OCR pipeline uses from each output):

* rec ``[N, T, C]`` softmax: CTC greedy decoding (argmax per step, repeats collapsed, blank 0
  dropped) through the character list stored in the model's ``character`` metadata -> text.
* det ``[N, 1, H, W]`` probability map: threshold 0.3, 2x2 dilation (rapidocr's
  ``use_dilation``), 8-connected components, boxes with side >= 3 px and mean probability
  >= 0.5 (``box_thresh``) -> axis-aligned boxes.
* cls ``[N, 2]``: argmax -> 0 or 180 degrees.

Usage::

    python benchmarks/corpus/ocr_task.py REC_MODEL OUT_DIR [--calib 64] [--eval 200]

writes ``{rec,cls,det}_{calib,eval}.npz`` (input ``x``; calibration and evaluation use
different seeds; half as many det pages as crops) and ``{rec,cls,det}_eval_meta.json``
(the rendered strings and angles).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

REC_HEIGHT, REC_WIDTH = 48, 320
CLS_HEIGHT, CLS_WIDTH = 48, 192
DET_SIZE = 320
DET_THRESH, DET_BOX_THRESH, DET_MIN_SIZE = 0.3, 0.5, 3
SEEDS = {"calib": 1, "eval": 2}
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
              "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf")
CJK_HINTS = ("NotoSansCJK", "NotoSerifCJK", "wqy", "DroidSansFallback", "SourceHanSans")


# ---------------------------------------------------------------- dictionary and decoding
def characters(rec_model: str | Path) -> list[str]:
    """rapidocr's character list: ``blank``, the model's ``character`` metadata, then space."""
    model = onnx.load(str(rec_model), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ValueError(f"{rec_model} has no 'character' metadata")
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, chars: Sequence[str]) -> list[str]:
    """Greedy CTC decoding of ``[N, T, C]`` scores into one string per sample."""
    ids = probs.argmax(-1)
    texts = []
    for row in ids:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(chars[i] for i in row[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (two-row dynamic programme)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(got: Sequence[str], want: Sequence[str]) -> float:
    """``1 - total edit distance / total reference length`` (clipped at 0)."""
    total = sum(len(w) for w in want)
    errors = sum(edit_distance(g, w) for g, w in zip(got, want, strict=True))
    return max(0.0, 1.0 - errors / max(total, 1))


# ---------------------------------------------------------------- detection boxes
def _dilate(mask: np.ndarray) -> np.ndarray:
    """2x2 dilation, as ``cv2.dilate(mask, np.ones((2, 2)))`` (anchor top-left)."""
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:, 1:] |= mask[:, :-1]
    out[1:, 1:] |= mask[:-1, :-1]
    return out


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int, list[tuple[int, int, int]]]]:
    """8-connected components of a binary image by union-find over row runs.

    Returns ``(y0, x0, y1, x1, runs)`` per component, runs as ``(row, start, stop)``.
    """
    runs: list[tuple[int, int, int]] = []
    row_runs: list[list[int]] = []
    for y, row in enumerate(mask):
        padded = np.concatenate(([0], row.astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(padded))
        here = []
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            here.append(len(runs))
            runs.append((y, int(start), int(stop)))
        row_runs.append(here)
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, len(row_runs)):
        above = row_runs[y - 1]
        for i in row_runs[y]:
            _, s, e = runs[i]
            for j in above:
                _, s2, e2 = runs[j]
                if s2 <= e and s <= e2:  # overlapping or diagonal-touching (8-connected)
                    parent[find(i)] = find(j)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(find(i), []).append(run)
    comps = []
    for members in groups.values():
        ys = [r[0] for r in members]
        comps.append((min(ys), min(r[1] for r in members), max(ys) + 1,
                      max(r[2] for r in members), members))
    return comps


def det_boxes(prob: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Text boxes ``(y0, x0, y1, x1)`` of one ``[H, W]`` probability map (see module doc)."""
    mask = _dilate(prob > DET_THRESH)
    boxes = []
    for y0, x0, y1, x1, _ in _components(mask):
        if min(y1 - y0, x1 - x0) < DET_MIN_SIZE:
            continue
        if float(prob[y0:y1, x0:x1].mean()) < DET_BOX_THRESH:
            continue
        boxes.append((y0, x0, y1, x1))
    return sorted(boxes)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    h = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0


def match_boxes(got: Sequence[tuple[int, int, int, int]],
                want: Sequence[tuple[int, int, int, int]], iou: float = 0.5) -> int:
    """Number of ``want`` boxes matched one-to-one (greedy by IoU) by a ``got`` box."""
    pairs = sorted(((_iou(g, w), i, j) for i, g in enumerate(got) for j, w in enumerate(want)),
                   reverse=True)
    used_g: set[int] = set()
    used_w: set[int] = set()
    for value, i, j in pairs:
        if value < iou:
            break
        if i not in used_g and j not in used_w:
            used_g.add(i)
            used_w.add(j)
    return len(used_w)


# ---------------------------------------------------------------- rendering
def _fonts() -> tuple[list[Path], list[Path]]:
    """Latin fonts (DejaVu family) and CJK fonts found on this machine."""
    roots = [Path("/usr/share/fonts"), Path.home() / ".fonts"]
    try:
        import matplotlib
        roots.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    found = [p for r in roots if r.is_dir() for p in sorted(r.rglob("*.tt[fc]"))]
    latin, seen = [], set()
    for name in FONT_NAMES:
        for p in found:
            if p.name == name and name not in seen:
                latin.append(p)
                seen.add(name)
    cjk = [p for p in found if any(h.lower() in p.name.lower() for h in CJK_HINTS)]
    if not latin:
        raise RuntimeError("no DejaVu font found (install matplotlib or fonts-dejavu)")
    return latin, cjk


class Renderer:
    """Draws random text lines and pages from the dictionary's Latin/digit (and CJK) subset."""

    def __init__(self, chars: Sequence[str], seed: int | np.random.Generator) -> None:
        from PIL import ImageFont

        self.rng = (seed if isinstance(seed, np.random.Generator)
                    else np.random.default_rng(seed))
        latin, cjk = _fonts()
        self.latin = [ImageFont.truetype(str(p), 32) for p in latin]
        self.latin_paths = latin
        self.cjk_paths = cjk
        known = set(chars)
        self.letters = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        if c in known]
        self.punct = [c for c in ".,:;-/()%$#&!?'" if c in known]
        self.cjk_chars = [c for c in chars if len(c) == 1 and 0x4E00 <= ord(c) <= 0x9FFF]

    def _word(self) -> str:
        r = self.rng
        kind = r.random()
        if kind < 0.2:
            return str(int(r.integers(0, 10 ** int(r.integers(1, 7)))))
        if kind < 0.3:
            return f"{r.integers(1, 29):02d}/{r.integers(1, 13):02d}/{r.integers(1990, 2030)}"
        if kind < 0.38:
            return f"{r.integers(0, 1000)}.{r.integers(0, 100):02d}"
        n = int(r.integers(2, 9))
        word = "".join(r.choice(self.letters) for _ in range(n))
        if r.random() < 0.5:
            word = word.lower()
        if r.random() < 0.3:
            word = word.capitalize()
        if self.punct and r.random() < 0.15:
            word += str(r.choice(self.punct))
        return word

    def line_text(self, max_chars: int) -> tuple[str, bool]:
        """A random line and whether it is CJK (only when a CJK font exists)."""
        if self.cjk_paths and self.cjk_chars and self.rng.random() < 0.25:
            n = int(self.rng.integers(2, max(3, max_chars // 2)))
            return "".join(self.rng.choice(self.cjk_chars) for _ in range(n)), True
        words: list[str] = []
        while True:
            w = self._word()
            if words and len(" ".join([*words, w])) > max_chars:
                break
            words.append(w)
            if self.rng.random() < 0.3:
                break
        return " ".join(words)[:max_chars], False

    def _font(self, size: int, cjk: bool):  # noqa: ANN202 - PIL type
        from PIL import ImageFont

        paths = self.cjk_paths if cjk else self.latin_paths
        return ImageFont.truetype(str(paths[int(self.rng.integers(len(paths)))]), size)

    def _degrade(self, img):  # noqa: ANN001, ANN202 - PIL image in and out
        from PIL import ImageFilter

        if self.rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(float(self.rng.uniform(0.3, 1.0))))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + self.rng.normal(0.0, float(self.rng.uniform(2.0, 10.0)), arr.shape)
        return np.clip(arr, 0, 255).astype(np.uint8)

    def _colors(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        bg = int(self.rng.integers(180, 256))
        fg = int(self.rng.integers(0, 90))
        tint = self.rng.integers(-15, 16, 3)
        return (tuple(int(np.clip(bg + t, 0, 255)) for t in tint),
                tuple(int(np.clip(fg + t, 0, 255)) for t in tint))

    def crop(self, max_ratio: float) -> tuple[np.ndarray, str]:
        """A tightly cropped text line (HxWx3 uint8, width/height <= ``max_ratio``)."""
        from PIL import Image, ImageDraw

        size = int(self.rng.integers(18, 48))
        text, cjk = self.line_text(max_chars=int(max_ratio * 1.6) + 2)
        font = self._font(size, cjk)
        while True:
            x0, y0, x1, y1 = font.getbbox(text)
            pad_x, pad_y = int(self.rng.integers(2, 8)), int(self.rng.integers(2, 7))
            w, h = x1 - x0 + 2 * pad_x, y1 - y0 + 2 * pad_y
            if w / h <= max_ratio or len(text) <= 1:
                break
            text = text[:-1].rstrip()
        bg, fg = self._colors()
        img = Image.new("RGB", (w, h), bg)
        ImageDraw.Draw(img).text((pad_x - x0, pad_y - y0), text, font=font, fill=fg)
        return self._degrade(img), text

    def page(self, size: int) -> tuple[np.ndarray, list[str]]:
        """A ``size`` x ``size`` page with a few text lines at random places and sizes."""
        from PIL import Image, ImageDraw

        bg, fg = self._colors()
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        y, lines = int(self.rng.integers(4, 30)), []
        while True:
            fsize = int(self.rng.integers(12, 30))
            if y + fsize + 4 > size:
                break
            text, cjk = self.line_text(max_chars=int(self.rng.integers(3, 30)))
            font = self._font(fsize, cjk)
            x = int(self.rng.integers(4, size // 2))
            draw.text((x, y), text, font=font, fill=fg)
            lines.append(text)
            y += int(fsize * self.rng.uniform(1.3, 2.5))
        return self._degrade(img), lines


# ---------------------------------------------------------------- preprocessing
def normalize(img: np.ndarray, bgr: bool = False) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` -> ``(x / 255 - 0.5) / 0.5`` CHW float32 (channels reversed
    with ``bgr``, as rapidocr feeds the images cv2 decodes)."""
    if bgr:
        img = img[..., ::-1]
    return ((img.astype(np.float32).transpose(2, 0, 1) / 255.0) - 0.5) / 0.5


def resize_norm(img: np.ndarray, height: int, width: int, bgr: bool = False) -> np.ndarray:
    """rapidocr's rec/cls ``resize_norm_img``: fixed height, aspect kept, zero right-padding."""
    from PIL import Image

    h, w = img.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    resized = np.asarray(Image.fromarray(img).resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = normalize(resized, bgr)
    return out


def text_lines(renderer: Renderer, n: int, height: int, width: int, *, turn: bool = False,
               bgr: bool = False) -> tuple[np.ndarray, list[str], list[int]]:
    """``n`` rendered lines preprocessed for a ``height`` x ``width`` rec/cls input.

    With ``turn`` every second line is turned 180 degrees (the angle classifier's task).

    Returns:
        The ``[n, 3, height, width]`` inputs, the texts and the angles (0 or 180).
    """
    x, texts, angles = [], [], []
    for i in range(n):
        img, text = renderer.crop(max_ratio=width / height)
        angle = 180 if turn and i % 2 else 0
        x.append(resize_norm(img[::-1, ::-1].copy() if angle else img, height, width, bgr))
        texts.append(text)
        angles.append(angle)
    return np.stack(x).astype(np.float32), texts, angles


def text_pages(renderer: Renderer, n: int, size: int, *,
               bgr: bool = False) -> tuple[np.ndarray, list[list[str]]]:
    """``n`` pages of ``size`` x ``size`` for the detector, and the lines on each."""
    x, lines = [], []
    for _ in range(n):
        img, page_lines = renderer.page(size)
        x.append(normalize(img, bgr))
        lines.append(page_lines)
    return np.stack(x).astype(np.float32), lines


def make_sets(rec_model: str | Path, out_dir: Path, n_calib: int, n_eval: int) -> dict[str, Path]:
    """Write calibration and evaluation ``.npz`` files for rec, cls and det; returns paths."""
    chars = characters(rec_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        r = Renderer(chars, SEEDS[split])
        rec, cls, angles, texts = [], [], [], []
        for i in range(n):
            img, text = r.crop(max_ratio=REC_WIDTH / REC_HEIGHT)
            rec.append(resize_norm(img, REC_HEIGHT, REC_WIDTH))
            texts.append(text)
            angle = 180 if i % 2 else 0
            cls.append(resize_norm(img[::-1, ::-1].copy() if angle else img,
                                   CLS_HEIGHT, CLS_WIDTH))
            angles.append(angle)
        # pages are 50x a crop's pixels: half as many
        det, pages = text_pages(r, max(8, n // 2), DET_SIZE)
        for task, arr, meta in (("rec", rec, texts), ("cls", cls, angles), ("det", det, pages)):
            path = out_dir / f"{task}_{split}.npz"
            np.savez(path, x=np.stack(arr).astype(np.float32))
            paths[f"{task}_{split}"] = path
            if split == "eval":
                (out_dir / f"{task}_eval_meta.json").write_text(json.dumps(meta))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rec_model", help="PP-OCR rec model (for its character list)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args(argv)
    for key, path in make_sets(args.rec_model, args.out_dir, args.calib, args.eval).items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
