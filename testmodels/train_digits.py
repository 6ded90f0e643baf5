"""Trains the bundled digits classifiers and writes them (BN kept) with calibration and eval data.

Needs the optional ``train`` extra (torch and scikit-learn): ``pip install -e .[train]``. This is
the only module of the project that imports torch. Run from the repository root with

    python -m testmodels.train_digits               # the ResNet and the two data files
    python -m testmodels.train_digits --arch vgg    # the VGG-style model (same data splits)

It loads scikit-learn's bundled 8x8 digits (1797 images, no download), scales them to [0, 1],
upsamples them 4x by nearest neighbour to 1x32x32, splits them (stratified, fixed seed) into
training data, 256 calibration and 512 evaluation samples, trains the network on CPU, writes
the ONNX graph by hand from the trained parameters and BN running statistics (so BatchNormalization
stays a separate node for the passes to fold), checks onnxruntime against torch and prints the
evaluation accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

from testmodels.graph_builder import GraphBuilder

OUT_DIR = Path(__file__).resolve().parent
N_CALIB = 256
N_EVAL = 512
UPSAMPLE = 4
MAX_SHIFT = 4
STAGES = ((16, 1, 1), (32, 2, 2), (64, 2, 2))
"""(width, first stride, blocks) per stage."""


def digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits as float32 [n, 1, 32, 32] in [0, 1] with int64 labels, split train/calib/eval."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    images = images.repeat(UPSAMPLE, axis=2).repeat(UPSAMPLE, axis=3)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, evaluation = train_test_split(index, test_size=N_EVAL, stratify=labels, random_state=seed)
    train, calib = train_test_split(
        rest, test_size=N_CALIB, stratify=labels[rest], random_state=seed
    )
    return {
        k: (images[i], labels[i])
        for k, i in (("train", train), ("calib", calib), ("eval", evaluation))
    }


class BasicBlock(nn.Module):
    """ResNet basic block with a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class DigitsResNet(nn.Module):
    """Stem conv, three stages of basic blocks (16/32/64 channels), global pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        blocks, cin = [], 16
        for width, stride, count in STAGES:
            for i in range(count):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


VGG_STAGES = ((32, 32), (64, 64), (64,))
"""Conv widths per VGG stage; a 2x2 MaxPool ends each stage (32 -> 16 -> 8 -> 4 pixels)."""
VGG_HIDDEN = 128


class DigitsVGG(nn.Module):
    """VGG-style: Conv3x3+BN+Relu stages with MaxPool, Flatten (64*4*4), FC 128, Relu, Dropout, FC.

    The plain, fully connected-headed shape that APoZ was proposed on (Hu et al. found the most
    zeros in VGG-16's conv5 and fc layers); here it is wider than digits needs.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for widths in VGG_STAGES:
            for width in widths:
                layers += [nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin * 4 * 4, VGG_HIDDEN)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(VGG_HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by up to MAX_SHIFT pixels in each axis, filling with zeros."""
    n, _, h, w = x.shape
    padded = F.pad(x, [MAX_SHIFT] * 4)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=generator).tolist()
    shifts = enumerate(zip(dy, dx, strict=True))
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in shifts])


def train(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int
) -> None:
    """Adam with a one-cycle learning rate, cross-entropy, random-shift augmentation."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    batch = 64
    steps = (len(y) + batch - 1) // batch
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            loss = F.cross_entropy(model(random_shift(x[idx], generator)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _conv_bn(g: GraphBuilder, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> str:
    y = g.conv(
        x,
        conv.out_channels,
        conv.kernel_size[0],
        conv.stride[0],
        pads=[conv.padding[0]] * 4,
        weight=_np(conv.weight),
    )
    stats = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return g.bn(y, [_np(t) for t in stats], epsilon=bn.eps)


def _gemm(g: GraphBuilder, x: str, fc: nn.Linear, output: str | None = None) -> str:
    return g.gemm(x, fc.out_features, weight=_np(fc.weight), bias=_np(fc.bias), output=output)


def to_onnx(model: DigitsResNet) -> onnx.ModelProto:
    """Writes the eval-mode network as Conv/BatchNormalization/Relu/Add/GAP/Flatten/Gemm."""
    g = GraphBuilder(size=32, in_channels=1)
    x = g.relu(_conv_bn(g, g.input, *model.stem))
    for block in model.blocks:
        y = g.relu(_conv_bn(g, x, block.conv1, block.bn1))
        y = _conv_bn(g, y, block.conv2, block.bn2)
        shortcut = x if block.shortcut is None else _conv_bn(g, x, *block.shortcut)
        x = g.relu(g.add(y, shortcut))
    x = g.flatten(g.global_avg_pool(x))
    return g.build(_gemm(g, x, model.fc, output="logits"), "digits_resnet")


def vgg_to_onnx(model: DigitsVGG) -> onnx.ModelProto:
    """Writes the eval-mode VGG as Conv/BatchNormalization/Relu/MaxPool/Flatten/Gemm."""
    g = GraphBuilder(size=32, in_channels=1)
    x = g.input
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            x = g.relu(_conv_bn(g, x, layer, layers[i + 1]))
        elif isinstance(layer, nn.MaxPool2d):
            x = g.pool(x, "MaxPool", 2, 2)
    x = g.relu(_gemm(g, g.flatten(x), model.fc1))
    return g.build(_gemm(g, x, model.fc2, output="logits"), "digits_vgg")


ARCHS = {"resnet": (DigitsResNet, to_onnx), "vgg": (DigitsVGG, vgg_to_onnx)}
"""--arch -> (torch module, exporter); the model is written to digits_<arch>.onnx."""


def main(argv: list[str] | None = None) -> None:
    """Trains, exports, verifies and writes the model and data files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--arch", choices=ARCHS, default="resnet",
        help="resnet: the bundled classifier, with the data files; vgg: the VGG-style model only",
    )
    args = parser.parse_args(argv)
    module, export = ARCHS[args.arch]

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    splits = digits_splits(args.seed)
    model = module()
    start = time.perf_counter()
    train(model, *splits["train"], epochs=args.epochs, seed=args.seed)
    print(f"trained on {len(splits['train'][1])} samples in {time.perf_counter() - start:.0f} s")

    onnx_model = export(model)
    onnx.checker.check_model(onnx_model, full_check=True)
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for name in ("calib", "eval"):
        images, labels = splits[name]
        with torch.no_grad():
            expected = _np(model(torch.from_numpy(images)))
        (logits,) = session.run(None, {"input": images})
        diff = float(np.abs(logits - expected).max())
        if diff >= 1e-4:
            raise RuntimeError(f"onnxruntime differs from torch on {name}: max abs {diff:.2e}")
        accuracy = float((logits.argmax(1) == labels).mean())
        print(
            f"{name}: {len(labels)} samples, onnxruntime top-1 {accuracy:.4f}, "
            f"max |ort - torch| {diff:.1e}"
        )
        if args.arch == "resnet":
            np.savez_compressed(args.out_dir / f"digits_{name}.npz", input=images, labels=labels)
    onnx.save(onnx_model, args.out_dir / f"digits_{args.arch}.onnx")
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params}; wrote {args.out_dir}")


if __name__ == "__main__":
    main()
