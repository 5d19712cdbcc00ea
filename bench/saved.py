"""What a codec saves on the benchmark models, counted from the captured graphs (no GPU needed).

    python bench/saved.py --models resnet50 gpt2 --batch 2 --codecs none int8 int4 int2 blpa4 \\
        --out bench/results/saved_cpu.json

One training step per model and codec, captured on this machine's CPU (eager
backend, bf16 autocast as on the GPU), and fxcompress's report summed three
ways: all saved tensors; the activations, that is all but autocast's bf16
weight copies, which stay exact and do not grow with the batch (at a small
CPU batch they are a large share, at the GPU's batch a small one); and the
activations made inside the repeated blocks (issue 6's GPT-2 targets are
stated for these). These are the bytes the
graphs save, not a GPU's measured activation memory (``bench_step.py``), and
the CPU's attention kernel differs from a GPU's where dropout is on (the CPU
has no fused attention with dropout: ``--no-dropout`` takes the fused path).

Needs torchvision (ResNet-50) and transformers (GPT-2) importable. With the CPU
torch wheel, torchvision's PyPI wheel cannot load its compiled operators; the
committed CPU results used torchvision 0.28.0's files with its ``__init__.py``
cut to ``from torchvision import models`` (its pure-Python models), on
``PYTHONPATH`` with pillow and transformers 5.24 installed with ``--target``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from common import GiB, block_paths, build, compress_config, in_blocks, open_results, put_result  # noqa: E402


def saved(model_name: str, codec: str, batch: int, no_dropout: bool) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    work = build(model_name, "cpu", batch)
    if no_dropout:
        for m in work.model.modules():  # transformers' attention reads its rate off its Dropout too
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    blocks = block_paths(work)
    config = compress_config(codec, work.ara_stride, work.asa_layers)
    module = fxcompress.compile(work.model, config, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = work.loss_fn(module(*work.inputs))
    loss.backward()
    rows = [r for r in fxcompress.explain(module).rows if r.counted]

    def total(keep) -> tuple[float, float]:
        picked = [r for r in rows if keep(r)]
        return sum(r.bytes_before for r in picked) / GiB, sum(r.bytes_after for r in picked) / GiB

    return {
        "model": model_name, "codec": codec, "batch": work.batch, "dropout": not no_dropout,
        "gib": total(lambda r: True),
        "activations_gib": total(lambda r: not r.from_parameters),
        "block_activations_gib": total(lambda r: in_blocks(r, blocks) and not r.from_parameters),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    p.add_argument("--codecs", nargs="+", default=["none", "int8", "int4", "int2"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-dropout", action="store_true", help="dropout off (the CPU's fused attention)")
    p.add_argument("--out", help="results JSON to add rows to (key 'saved')")
    args = p.parse_args()
    results = open_results(args.out, "saved", "cpu", " ".join(["python", *sys.argv]))
    print(f"{'model':<10} {'codec':<7} {'all GiB':>16} {'activations GiB':>16} {'x':>6} {'in blocks GiB':>16} {'x':>6}")
    for model in args.models:
        for codec in args.codecs:
            print(f"[saved] {model} / {codec} ...", file=sys.stderr, flush=True)
            row = saved(model, codec, args.batch, args.no_dropout)
            (a0, a1), (w0, w1), (b0, b1) = row["gib"], row["activations_gib"], row["block_activations_gib"]
            print(f"{model:<10} {codec:<7} {a0:7.3f}->{a1:7.3f} {w0:7.3f}->{w1:7.3f} {w0 / w1 if w1 else 0:6.2f} "
                  f"{b0:7.3f}->{b1:7.3f} {b0 / b1 if b1 else 0:6.2f}", flush=True)
            put_result(args.out, results, "saved", row, ("model", "codec", "batch", "dropout"))


if __name__ == "__main__":
    main()
