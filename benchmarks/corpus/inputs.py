"""Realistic inputs for the corpus models: photos, rendered text, speech-like audio, file bytes.

No data set is downloaded. Photos are random crops of the two photographs matplotlib ships as
sample data (the bench and test extras install matplotlib); the OCR models' text lines and
pages come from ``ocr_task`` (random Latin strings of the recognizer's dictionary in DejaVu
fonts, blurred and noisy), preprocessed as RapidOCR does (BGR, ``(x / 255 - 0.5) / 0.5``,
lines right-padded with zeros); the document-orientation pages are lines in Pillow's
built-in font on paper or a pale photo; audio is a synthetic voiced signal (harmonics of a
moving pitch shaped by vowel formants, in syllables separated by pauses and background noise)
streamed through the silero model itself, so the recurrent state fed with each chunk is the
state the model really carries there; file bytes are real files of this repository and of
matplotlib's sample data, cut into magika's beginning/end features. Every generator is
deterministic for a seed (up to the library versions that render the fonts and decode the
photos).

Arrays have the sample axis first, except where the model's ``batch_axes`` say otherwise.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from benchmarks.corpus import ocr_task
from benchmarks.corpus.models import CorpusModel

ROOT = Path(__file__).resolve().parents[2]
Generator = Callable[[Path, int, np.random.Generator], dict[str, np.ndarray]]

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
_WORDS = ("invoice", "total", "amount", "date", "receipt", "number", "address", "phone",
          "order", "price", "tax", "paid", "balance", "due", "item", "quantity", "ONNX",
          "model", "page", "section", "report", "March", "2024", "12.50", "No. 4471",
          "Street", "City", "email", "customer", "signature", "approved", "reference",
          "delivery", "weight", "kg", "EUR", "USD", "Room 301", "Tel.", "ID 88213")


def make_inputs(model: CorpusModel, path: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` realistic samples for ``model`` (loaded from ``path`` where the data needs it)."""
    return GENERATORS[model.inputs](path, n, np.random.default_rng(seed))


# -- photos ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _photos() -> tuple:
    from PIL import Image

    folder = resources.files("matplotlib") / "mpl-data" / "sample_data"
    images = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with resources.as_file(folder / name) as file, Image.open(file) as image:
            images.append(image.convert("RGB"))
    return tuple(images)


def _photo_crops(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` RGB uint8 crops ``[n, size, size, 3]``: random photo, scale, place, flip, light."""
    from PIL import Image

    photos = _photos()
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[0] if rng.random() < 0.75 else photos[1]
        side = int(min(photo.size) * rng.uniform(0.35, 1.0))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize(
            (size, size), Image.Resampling.BILINEAR)
        array = np.asarray(crop, np.float32)
        if rng.random() < 0.5:
            array = array[:, ::-1]
        array = array * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
        array += rng.normal(0, 3, array.shape)
        out[i] = np.clip(array, 0, 255).astype(np.uint8)
    return out


def photo_nchw_imagenet(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """224x224 RGB crops, ImageNet mean/std, NCHW (the model zoo classifiers)."""
    x = (_photo_crops(rng, n, 224) / np.float32(255) - _IMAGENET_MEAN) / _IMAGENET_STD
    return {_input_names(path)[0]: x.transpose(0, 3, 1, 2).astype(np.float32)}


def photo_nhwc_caffe(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """224x224 BGR crops minus the caffe mean, NHWC (open_nsfw's preprocessing)."""
    x = _photo_crops(rng, n, 224)[..., ::-1].astype(np.float32) - _CAFFE_MEAN_BGR
    return {_input_names(path)[0]: np.ascontiguousarray(x)}


def photo_yolo_320(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """320x320 RGB crops in [0, 1], NCHW (nudenet's preprocessing)."""
    x = _photo_crops(rng, n, 320).astype(np.float32) / 255
    return {_input_names(path)[0]: np.ascontiguousarray(x.transpose(0, 3, 1, 2))}


# -- rendered text -----------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _phrase(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, int(rng.integers(2, 6))))


def _text_line(rng: np.random.Generator, font_size: int):
    """One line of dark text on a light background, cropped to the text with a margin."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    text = _phrase(rng)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), text, font=font)
    margin = max(2, font_size // 5)
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), paper)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=ink, font=font)
    return image


def _ocr_renderer(path: Path, rng: np.random.Generator) -> ocr_task.Renderer:
    """The OCR text renderer, over the model's dictionary when it has one (the recognizer)."""
    try:
        chars = ocr_task.characters(path)
    except ValueError:  # the detector and the classifier carry none: Latin and digits
        chars = list(string.ascii_letters + string.digits + string.punctuation)
    return ocr_task.Renderer(chars, rng)


def ocr_line_48x320(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Text lines for the recognizer (3x48x320), RapidOCR's preprocessing (``ocr_task``)."""
    x, _, _ = ocr_task.text_lines(_ocr_renderer(path, rng), n, 48, 320, bgr=True)
    return {_input_names(path)[0]: x}


def ocr_line_48x192(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Text lines for the direction classifier (3x48x192), every second one turned 180
    degrees."""
    x, _, _ = ocr_task.text_lines(_ocr_renderer(path, rng), n, 48, 192, turn=True, bgr=True)
    return {_input_names(path)[0]: x}


def _page(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``size``x``size`` RGB uint8 page: paper (or a pale photo) with lines of text."""
    from PIL import Image

    if rng.random() < 0.3:
        base = _photo_crops(rng, 1, size)[0].astype(np.float32) * 0.3 + 170
    else:
        base = np.full((size, size, 3), rng.integers(215, 256, 3), np.float32)
    base += rng.normal(0, 4, base.shape)
    page = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    for _ in range(int(rng.integers(3, 10))):
        line = _text_line(rng, int(rng.integers(12, 36)))
        if line.size[0] > size:
            line = line.crop((0, 0, size, line.size[1]))
        x = int(rng.integers(0, size - line.size[0] + 1))
        y = int(rng.integers(0, max(1, size - line.size[1])))
        page.paste(line, (x, y))
    return np.asarray(page)


def ocr_page_320(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """320x320 pages of text lines for the text detector (``ocr_task``)."""
    x, _ = ocr_task.text_pages(_ocr_renderer(path, rng), n, 320, bgr=True)
    return {_input_names(path)[0]: x}


def doc_orientation_224(path: Path, n: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """224x224 pages turned by 0/90/180/270 degrees, ImageNet mean/std, NCHW."""
    pages = np.stack([np.rot90(_page(rng, 224), int(rng.integers(0, 4))) for _ in range(n)])
    x = (pages[..., ::-1] / np.float32(255) - _IMAGENET_MEAN) / _IMAGENET_STD
    return {_input_names(path)[0]: np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)}


# -- audio -------------------------------------------------------------------------------

_RATE = 16000
_CHUNK = 512
_CONTEXT = 64
#: (F1, F2, F3) in Hz of a few vowels.
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
           (570, 840, 2410), (660, 1720, 2410))


def speech_like(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Float32 audio in [-1, 1] at 16 kHz: voiced syllables, pauses and background noise."""
    audio = rng.normal(0, 0.003, samples)
    t = 0
    while t < samples:
        t += int(rng.uniform(0.05, 0.6) * _RATE)  # a pause
        length = int(rng.uniform(0.12, 0.35) * _RATE)
        if t + length > samples:
            break
        time = np.arange(length) / _RATE
        f0 = rng.uniform(90, 230) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(2, 5) * time))
        phase = 2 * np.pi * np.cumsum(f0) / _RATE
        formants = _VOWELS[int(rng.integers(len(_VOWELS)))]
        voiced = np.zeros(length)
        for k in range(1, int(3800 / f0.mean())):
            gain = sum(np.exp(-0.5 * ((k * f0.mean() - f) / 110) ** 2) / (1 + i)
                       for i, f in enumerate(formants))
            voiced += (gain + 0.02) * np.sin(k * phase) / k**0.5
        envelope = np.sin(np.pi * np.arange(length) / length) ** 2
        audio[t:t + length] += rng.uniform(0.1, 0.5) * voiced * envelope / max(
            np.abs(voiced).max(), 1e-6)
        t += length
    return np.clip(audio, -1, 1).astype(np.float32)


def _chunks(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` consecutive 576-sample windows (64 context + 512 new samples) of one recording."""
    audio = speech_like(rng, (n + 1) * _CHUNK + _CONTEXT)
    return np.stack([audio[i * _CHUNK:i * _CHUNK + _CONTEXT + _CHUNK] for i in range(n)])


def vad_stream(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` consecutive chunks with the state the model itself carries into each of them
    (after 16 warm-up chunks): input ``[n, 576]``, state ``[2, n, 128]``, sr 0-d 16000."""
    import onnxruntime as ort

    warmup = 16
    windows = _chunks(rng, n + warmup)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    state = np.zeros((2, 1, 128), np.float32)
    states = []
    for window in windows:
        states.append(state)
        feed = {"input": window[None], "state": state}
        if "sr" in names:
            feed["sr"] = np.array(_RATE, np.int64)
        state = np.asarray(session.run(None, feed)[1], np.float32)
    arrays = {"input": windows[warmup:], "state": np.concatenate(states[warmup:], axis=1)}
    if "sr" in names:
        arrays["sr"] = np.array(_RATE, np.int64)
    return arrays


def vad_sequence(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` consecutive chunks ``[n, 576]`` as one sequence, zero LSTM state ``h``, ``c``."""
    zeros = np.zeros((1, 1, 128), np.float32)
    return {"input": _chunks(rng, n), "h": zeros, "c": zeros.copy()}


# -- file bytes --------------------------------------------------------------------------

_MAGIKA_BLOCK, _MAGIKA_SIDE, _MAGIKA_PAD = 4096, 1024, 256
_WHITESPACE = b" \t\n\r\x0b\x0c"


def magika_features(content: bytes) -> np.ndarray:
    """magika's standard_v3 features: the first and last 1024 bytes of the whitespace-
    stripped first and last 4096-byte blocks, padded with token 256."""
    beg = content[:_MAGIKA_BLOCK].lstrip(_WHITESPACE)[:_MAGIKA_SIDE]
    end = content[-_MAGIKA_BLOCK:].rstrip(_WHITESPACE)[-_MAGIKA_SIDE:]
    out = np.full(2 * _MAGIKA_SIDE, _MAGIKA_PAD, np.int32)
    out[:len(beg)] = np.frombuffer(beg, np.uint8)
    if end:
        out[2 * _MAGIKA_SIDE - len(end):] = np.frombuffer(end, np.uint8)
    return out


def _file_pool() -> list[Path]:
    folder = resources.files("matplotlib") / "mpl-data" / "sample_data"
    files = [Path(str(p)) for p in folder.iterdir() if p.is_file()]
    for pattern in ("*.md", "*.toml", "onnxopt/*.py", "passes/*/*.py", "testmodels/*",
                    "benchmarks/results/*", ".ci/*"):
        files += [p for p in ROOT.glob(pattern) if p.is_file()]
    return sorted(set(files))


def file_bytes(path: Path, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Features of real files (whole, or a random stretch of a large one), int32 [n, 2048]."""
    pool = _file_pool()
    rows = []
    for _ in range(n):
        content = pool[int(rng.integers(len(pool)))].read_bytes()
        if len(content) > 3 * _MAGIKA_BLOCK and rng.random() < 0.5:
            start = int(rng.integers(0, len(content) - 2 * _MAGIKA_BLOCK))
            content = content[start:start + int(rng.integers(2 * _MAGIKA_BLOCK,
                                                            len(content) - start + 1))]
        rows.append(magika_features(content))
    return {_input_names(path)[0]: np.stack(rows)}


def _input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in weights]


GENERATORS: dict[str, Generator] = {
    "photo_nchw_imagenet": photo_nchw_imagenet,
    "photo_nhwc_caffe": photo_nhwc_caffe,
    "photo_yolo_320": photo_yolo_320,
    "ocr_page_320": ocr_page_320,
    "ocr_line_48x320": ocr_line_48x320,
    "ocr_line_48x192": ocr_line_48x192,
    "doc_orientation_224": doc_orientation_224,
    "vad_stream": vad_stream,
    "vad_sequence": vad_sequence,
    "file_bytes": file_bytes,
}
