"""Fidelity runs: real training with compressed activations against exact training.

    python bench/fidelity.py --out bench/results/fidelity_cpu.json

- digits: scikit-learn's digits (1,797 8x8 images), a conv/BN/ReLU/max-pool
  network, split ``train_test_split(test_size=0.25, random_state=0)``,
  12 epochs of SGD; reported: test accuracy (%).
- digits-resnet: the same data and schedule on a small post-activation
  ResNet (stem, three identity-shortcut blocks of width 32), for the
  learning rules: ``ara`` is ``learning_rule="ara"`` with ``ara_stride=3``
  (the three blocks' inputs share the first one) and the lossless codec;
  ``ara+int4`` the same with int4 for what ARA leaves.
- chars also runs the ASA variants: ``asa`` (the FFN's second linear, after
  GELU: the paper's ASA1), ``asa2`` (both FFN linears), ``asa2+int8``.
- chars: ``../shared/data/shakespeare.txt``, a character-level transformer,
  the first 90% of the text for training and the last 10% for validation,
  300 AdamW steps of 32 x 64 characters; reported: validation loss (8 fixed
  batches).

The tests (tests/test_training.py) run the same functions.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxcompress  # noqa: E402
from common import compress_config, environment  # noqa: E402
from fxcompress.models import BasicBlock, TinyTransformer  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project's shared data sits beside the checkout (../shared), or inside it.
SHAKESPEARE = next(
    (p for p in (_ROOT.parent / "shared" / "data" / "shakespeare.txt", _ROOT / "shared" / "data" / "shakespeare.txt") if p.exists()),
    _ROOT.parent / "shared" / "data" / "shakespeare.txt",
)


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(BasicBlock(width, width) for _ in range(3)))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# The chars transformer's ASA levels: 1 = the FFN's second linear, 2 = both FFN linears.
ASA_LAYERS = {1: ("blocks.*.out",), 2: ("blocks.*.fc", "blocks.*.out")}


def _config(variant: str) -> fxcompress.CompressConfig:
    """A codec name, or ``ara``/``ara+int4`` (stride 3), ``asa``/``asa2``/``asa2+int8`` (see the docstring)."""
    return compress_config(variant, ara_stride=3, asa_layers=ASA_LAYERS)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=0)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train_digits(codec: str, net: type[nn.Module] = DigitsNet) -> float:
    x, y, xt, yt = _digits()
    torch.manual_seed(0)
    model = net()
    cm = fxcompress.compile(model, _config(codec), backend="eager")
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - 63, 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(cm(x[b]), y[b]).backward()
            opt.step()
    cm.eval()
    with torch.no_grad():
        return float((cm(xt).argmax(1) == yt).float().mean()) * 100


@functools.lru_cache(maxsize=1)
def _shakespeare():
    if not SHAKESPEARE.exists():
        raise FileNotFoundError(f"{SHAKESPEARE} is missing: the training tests need ../shared/data beside the repo")
    text = SHAKESPEARE.read_text(encoding="ascii", errors="replace")
    vocab = sorted(set(text))
    table = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([table[c] for c in text], dtype=torch.long)  # ~4.7M characters
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:], len(vocab)


def train_chars(codec: str, steps: int = 300, batch: int = 32, seq: int = 64) -> float:
    train, val, vocab = _shakespeare()
    torch.manual_seed(0)
    model = TinyTransformer(vocab=vocab, d=64, heads=4, layers=2, seq=seq, p=0.0)
    cm = fxcompress.compile(model, _config(codec), backend="eager")
    opt = torch.optim.AdamW(cm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch_from(data, gen):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        idx = start[:, None] + torch.arange(seq + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    for _ in range(steps):
        xb, yb = batch_from(train, g)
        opt.zero_grad()
        nn.functional.cross_entropy(cm(xb).flatten(0, 1), yb.flatten()).backward()
        opt.step()
    cm.eval()
    gv = torch.Generator().manual_seed(1)
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(cm(xb).flatten(0, 1), yb.flatten()) for xb, yb in
                  (batch_from(val, gv) for _ in range(8))]
    return float(torch.stack(losses).mean())



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codecs", nargs="+", default=["none", "lossless", "int8", "int4", "int2", "fp8", "blpa8", "blpa4"])
    p.add_argument("--ara", nargs="+", default=["none", "ara", "ara+int4"], help="variants for digits-resnet")
    p.add_argument("--asa", nargs="+", default=["asa", "asa2", "asa2+int8"], help="extra variants for chars")
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    tasks = (
        ("digits accuracy %", train_digits, args.codecs),
        ("digits-resnet accuracy %", functools.partial(train_digits, net=DigitsResNet), args.ara),
        ("chars val loss", train_chars, [*args.codecs, *args.asa]),
    )
    for task, fn, variants in tasks:
        for codec in variants:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            value = fn(codec)
            rows.append({"task": task, "codec": codec, "value": value, "seconds": time.perf_counter() - t0})
            print(f"{task:<18} {codec:<9} {value:8.4f}  ({rows[-1]['seconds']:.0f}s)", flush=True)
    if args.out:
        cmd = " ".join([os.path.relpath(__file__)] + sys.argv[1:])
        with open(args.out, "w") as f:
            json.dump({"command": cmd, "environment": environment("cpu"), "fidelity": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
