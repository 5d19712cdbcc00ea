"""One training step, fxcompress against torch.compile: saved bytes, activation memory, throughput.

    # issue 2: lossless on ResNet-50 and GPT-2 small
    python bench/bench_step.py --device cuda --models resnet50 gpt2 --out bench/results/lossless_h100.json
    # issue 3: quantized codecs on ResNet-50, batch 256
    python bench/bench_step.py --device cuda --models resnet50 --variants torch.compile \
        "fxcompress int8" "fxcompress int4" "fxcompress int2" "fxcompress fp8" --out bench/results/quant_h100.json

Each variant runs in its own process so that memory and caches start clean.
``torch.compile`` is Inductor; ``fxcompress CODEC`` is fxcompress.compile with
that codec on the Inductor backend; bf16 autocast on CUDA. Memory is the
step's peak minus what is allocated before it (weights, optimizer state).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from common import GiB, Measurement, measure, run_child, write_results  # noqa: E402

VARIANTS = ("torch.compile", "fxcompress none", "fxcompress lossless")  # the default set
OPTIMIZER = {"resnet50": "sgd", "gpt2": "adamw"}


def wrap_for(variant: str, backend: str = "inductor"):
    if variant == "torch.compile":
        return torch.compile
    if not variant.startswith("fxcompress "):
        raise SystemExit(f"variant {variant!r} is not accepted; use 'torch.compile' or 'fxcompress CODEC'")
    codec = variant.split()[-1]
    return lambda m: fxcompress.compile(m, fxcompress.CompressConfig(codec=codec), backend=backend)


def run_one(args) -> None:
    m, module = measure(args.one_model, args.one_variant, wrap_for(args.one_variant), args.device,
                        args.batch, args.steps, args.warmup, OPTIMIZER.get(args.one_model, "sgd"))
    if isinstance(module, fxcompress.CompressedModule):
        report = fxcompress.explain(module)
        m.saved_gib_before, m.saved_gib_after = report.saved_bytes_before / GiB, report.saved_bytes_after / GiB
    print("RESULT " + json.dumps(m.__dict__), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--one-model", help=argparse.SUPPRESS)
    p.add_argument("--one-variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_model:
        return run_one(args)

    for variant in args.variants:
        wrap_for(variant)  # a bad name stops here, before any run
    rows = []
    for model in args.models:
        for variant in args.variants:
            print(f"[bench] {model} / {variant} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--one-model", model, "--one-variant", variant]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            result = run_child(cmd, f"[bench] {model} / {variant}")
            if result is None:
                continue
            rows.append(Measurement(**result))
            if args.out:  # after every variant, so that a run cut short keeps what it measured
                write_results(args.out, " ".join([os.path.relpath(__file__)] + sys.argv[1:]), args.device, rows)
            r = rows[-1]
            print(f"[bench] {model} / {variant}: {r.items_per_s:,.0f}/s, activation {r.activation_gib:.2f} GiB",
                  file=sys.stderr, flush=True)

    print(f"\n{'model':<10} {'variant':<22} {'items/s':>10} {'x tc':>6} {'act GiB':>8} {'saved GiB':>16} {'compile s':>9}")
    base = {r.model: r for r in rows if r.variant == "torch.compile"}
    for r in rows:
        rel = r.items_per_s / base[r.model].items_per_s if r.model in base else float("nan")
        saved = f"{r.saved_gib_before:.2f}->{r.saved_gib_after:.2f}" if r.saved_gib_before is not None else "-"
        print(f"{r.model:<10} {r.variant:<22} {r.items_per_s:>10,.0f} {rel:>6.2f} {r.activation_gib:>8.2f} {saved:>16} {r.compile_s:>9.1f}")


if __name__ == "__main__":
    main()
