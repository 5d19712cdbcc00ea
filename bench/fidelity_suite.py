"""Issue 6's fidelity runs: full training schedules per codec, validation curves, and their plot.

    # on the GPU, one task per device call; rows accumulate in --out (same task and variant: replaced)
    python bench/fidelity_suite.py --task babygpt --variants none int8 int4 int2 fp8 asa2 \\
        --out bench/results/fidelity_gpu.json --plot bench/results/fidelity_gpu.png
    python bench/fidelity_suite.py --task digits-resnet18 --variants none int4 int2 blpa4 ara \\
        --out bench/results/fidelity_gpu.json --plot bench/results/fidelity_gpu.png
    # redraw the plot from a results file
    python bench/fidelity_suite.py --plot bench/results/fidelity_gpu.png --out bench/results/fidelity_gpu.json --variants

- ``babygpt``: the well-known "baby GPT" for character-level Shakespeare (6
  layers, 6 heads, width 384, context 256, dropout 0.2; fxcompress's
  ``TinyTransformer``) on ``../shared/data/shakespeare.txt``, the first 90% of
  the text for training and the last 10% for validation; batch 64, AdamW
  (lr 1e-3, betas 0.9/0.99, weight decay 0.1), 100 warm-up steps then cosine
  decay to 1e-4, gradient clipping at 1.0, ``--steps`` steps (2,000 by default).
  Reported: validation loss (``--eval-batches`` fixed batches) every
  ``--eval-every`` steps and at the end.
- ``digits-resnet18``: a ResNet-18-style network (BasicBlocks 2-2-2-2, widths
  ``--width`` x 1/2/4/8, post-activation, identity or projection shortcuts) on
  scikit-learn's digits upsampled bilinearly to 32 x 32, the split of
  ``bench/fidelity.py``; SGD (lr 0.05, momentum 0.9, weight decay 5e-4),
  batch 64, ``--epochs`` epochs (15 by default), cosine decay. Reported: test
  accuracy after every epoch.

Every variant starts from the same seed and sees the same batches. Variants
are codecs or learning rules (``ara``: stride 2, ``asa2``: both FFN linears),
as in ``bench/common.py``'s ``compress_config``. On CUDA: bf16 autocast and
the Inductor backend; on CPU: fp32 and the eager backend.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxcompress  # noqa: E402
from common import compress_config, open_results, put_result  # noqa: E402
from fidelity import ASA_LAYERS, _digits, _shakespeare  # noqa: E402
from fxcompress.models import BasicBlock, TinyTransformer  # noqa: E402


class ResNet18(nn.Module):
    """ResNet-18's layout for small images: a 3x3 stem, four stages of two BasicBlocks."""

    def __init__(self, width: int = 64, n_out: int = 10, in_ch: int = 1):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_ch, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        stages, c_in = [], w
        for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stages.append(nn.Sequential(BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c)))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, n_out)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def _compile(model: nn.Module, variant: str, device: str) -> nn.Module:
    config = compress_config(variant, ara_stride=2, asa_layers=ASA_LAYERS)
    return fxcompress.compile(model, config, backend="inductor" if device.startswith("cuda") else "eager")


def _cosine(step: int, total: int, warmup: int, lr: float, lr_min: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t))


def run_babygpt(variant: str, device: str, steps: int, eval_every: int, eval_batches: int,
                batch: int = 64, seq: int = 256) -> list[tuple[int, float]]:
    train, val, vocab = _shakespeare()
    torch.manual_seed(0)
    model = TinyTransformer(vocab=vocab, d=384, heads=6, layers=6, seq=seq, p=0.2).to(device)
    cm = _compile(model, variant, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    cuda = device.startswith("cuda")

    def batch_from(data, gen):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        chunk = data[start[:, None] + torch.arange(seq + 1)].to(device)
        return chunk[:, :-1], chunk[:, 1:]

    def loss_of(module, xb, yb):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            return F.cross_entropy(module(xb).flatten(0, 1).float(), yb.flatten())

    def evaluate() -> float:
        cm.eval()
        gv = torch.Generator().manual_seed(1)
        with torch.no_grad():
            value = float(torch.stack([loss_of(cm, *batch_from(val, gv)) for _ in range(eval_batches)]).mean())
        cm.train()
        return value

    curve = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, 100, 1e-3, 1e-4)
        xb, yb = batch_from(train, g)
        opt.zero_grad(set_to_none=True)
        loss_of(cm, xb, yb).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate()))
            print(f"  babygpt {variant} step {step + 1}/{steps}: val loss {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
    return curve


def run_digits_resnet18(variant: str, device: str, epochs: int, width: int) -> list[tuple[int, float]]:
    x, y, xt, yt = (t.to(device) for t in _digits())
    x, xt = (F.interpolate(t, size=32, mode="bilinear", align_corners=False) for t in (x, xt))
    torch.manual_seed(0)
    model = ResNet18(width).to(device).to(memory_format=torch.channels_last)
    cm = _compile(model, variant, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = (len(y) - 63) // 64 + (1 if (len(y) - 63) % 64 else 0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(0)
    cuda = device.startswith("cuda")
    curve = []
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g).to(device)
        for i in range(0, len(y) - 63, 64):
            b = perm[i : i + 64]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(cm(x[b]).float(), y[b])
            loss.backward()
            opt.step()
            sched.step()
        cm.eval()
        with torch.no_grad():
            curve.append((epoch + 1, float((cm(xt).argmax(1) == yt).float().mean()) * 100))
        cm.train()
        print(f"  digits-resnet18 {variant} epoch {epoch + 1}/{epochs}: accuracy {curve[-1][1]:.2f}%", file=sys.stderr, flush=True)
    return curve


TASKS = {
    "babygpt": ("validation loss", "step"),
    "digits-resnet18": ("test accuracy %", "epoch"),
}


def plot(rows: list[dict], path: str) -> None:
    """One panel per task, one curve per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric, unit = TASKS[task]
        for r in (r for r in rows if r["task"] == task):
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, label=f"{r['variant']} ({r['value']:.4g})", linewidth=1.4)
        ax.set_title(f"{task}: {metric}")
        ax.set_xlabel(unit)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if task == "babygpt":
            finals = [r["value"] for r in rows if r["task"] == task]
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)  # the end of training is what differs
        else:
            ax.set_ylim(max(0.0, min(r["value"] for r in rows if r["task"] == task) - 10), 100.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--variants", nargs="*", default=[])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2000, help="babygpt")
    p.add_argument("--eval-every", type=int, default=250, help="babygpt")
    p.add_argument("--eval-batches", type=int, default=50, help="babygpt")
    p.add_argument("--epochs", type=int, default=15, help="digits-resnet18")
    p.add_argument("--width", type=int, default=64, help="digits-resnet18")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", help="PNG of the curves of every row in --out")
    args = p.parse_args()

    if args.variants and args.task is None:
        raise SystemExit("--variants needs --task")
    for v in args.variants:
        compress_config(v, asa_layers=ASA_LAYERS)  # a bad name stops here, before any run
    command = " ".join([os.path.relpath(__file__)] + sys.argv[1:]) if args.variants else None
    data = open_results(args.out, "curves", args.device, command)
    for variant in args.variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        if args.task == "babygpt":
            curve = run_babygpt(variant, args.device, args.steps, args.eval_every, args.eval_batches)
            settings = {"steps": args.steps, "eval_batches": args.eval_batches}
        else:
            curve = run_digits_resnet18(variant, args.device, args.epochs, args.width)
            settings = {"epochs": args.epochs, "width": args.width}
        row = {"task": args.task, "variant": variant, "metric": TASKS[args.task][0], "value": curve[-1][1],
               "curve": curve, "seconds": time.perf_counter() - t0, **settings}
        put_result(args.out, data, "curves", row, same=("task", "variant"))
        print(f"{args.task} {variant}: {row['value']:.4f} ({row['seconds']:.0f} s)", flush=True)
    if args.plot:
        plot(data["curves"], args.plot)


if __name__ == "__main__":
    main()
