"""Is a lossy codec's weight gradient unbiased? The mean over many rounding draws against the exact gradient.

    python bench/grad_bias.py --model resnet --codecs int4 int2 --draws 64
    python bench/grad_bias.py --model resnet --codecs int4 --draws 64 --split-codes

One training step of a zoo model (dropout off), eager backend, repeated with
``draws`` different seeds; reports the mean one-draw cosine similarity to
the exact weight gradient, and the relative error of the mean gradient. For
an unbiased codec the latter shrinks like one draw's error / sqrt(draws); a
bias stays. ``--split-codes`` makes the policy keep ReLU's predicate in the
codes (``SplitAffine``) under stochastic rounding too, which it does not do
by default: this is the measurement behind that choice.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.models import ZOO  # noqa: E402


def weight_grads(model, x, module, seed: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    module(x).float().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.dim() > 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet", choices=sorted(ZOO))
    p.add_argument("--codecs", nargs="+", default=["int4", "int2"])
    p.add_argument("--draws", type=int, default=64)
    p.add_argument("--split-codes", action="store_true")
    args = p.parse_args()
    if args.split_codes:
        from fxcompress.passes import select

        select.SPLIT_STOCHASTIC = True
    torch.manual_seed(0)
    model = ZOO[args.model]()
    for m in model.modules():
        if isinstance(getattr(m, "p", None), float):
            m.p = 0.0
    x = model.example_input()
    exact = weight_grads(model, x, model, 0)
    for codec in args.codecs:
        torch._dynamo.reset()
        cm = fxcompress.compile(model, fxcompress.CompressConfig(codec=codec), backend="eager")
        mean, cos = torch.zeros_like(exact), 0.0
        for seed in range(args.draws):
            g = weight_grads(model, x, cm, 100 + seed)
            mean += g / args.draws
            cos += float(torch.nn.functional.cosine_similarity(g, exact, dim=0)) / args.draws
        labels = sorted({r.codec for r in fxcompress.explain(cm).rows if "le(0)" in r.codec})
        err = float((mean - exact).norm() / exact.norm())
        print(f"{args.model} {codec} ({', '.join(labels)}): one draw cosine {cos:.4f}; "
              f"mean of {args.draws} draws: {err:.4f} relative error")


if __name__ == "__main__":
    main()
