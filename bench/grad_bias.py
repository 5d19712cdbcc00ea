"""Is a lossy codec's weight gradient unbiased? The mean over many rounding draws against the exact gradient.

    python bench/grad_bias.py --model resnet --codecs int4 int2 --draws 64 --relu-codes clamped mask split

One training step of a zoo model (dropout off), eager backend, repeated with
``draws`` different seeds; reports the mean one-draw cosine similarity to
the exact weight gradient, and the relative error of the mean gradient. For
an unbiased codec the latter shrinks like one draw's error / sqrt(draws); a
bias stays. ``--relu-codes`` says how ReLU's ``x <= 0`` is kept beside the
codes of its output: ``clamped`` (the default policy: a reserved code,
``ClampedAffine``), ``mask`` (a 1-bit mask, ``MaskedLossy``) or ``split``
(``SplitAffine`` under stochastic rounding too, which the policy never
does): the measurement behind the policy's choice.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.models import ZOO  # noqa: E402
from fxcompress.passes import select  # noqa: E402


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
    p.add_argument("--relu-codes", nargs="+", default=["clamped"], choices=["clamped", "mask", "split"])
    args = p.parse_args()
    torch.manual_seed(0)
    model = ZOO[args.model]()
    for m in model.modules():
        if isinstance(getattr(m, "p", None), float):
            m.p = 0.0
    x = model.example_input()
    exact = weight_grads(model, x, model, 0)
    for relu_codes, codec in itertools.product(args.relu_codes, args.codecs):
        select.CLAMPED_CODES, select.SPLIT_STOCHASTIC = relu_codes == "clamped", relu_codes == "split"
        torch._dynamo.reset()
        cm = fxcompress.compile(model, fxcompress.CompressConfig(codec=codec), backend="eager")
        mean, cos = torch.zeros_like(exact), 0.0
        for seed in range(args.draws):
            g = weight_grads(model, x, cm, 100 + seed)
            mean += g / args.draws
            cos += float(torch.nn.functional.cosine_similarity(g, exact, dim=0)) / args.draws
        report = fxcompress.explain(cm)
        labels = sorted({r.codec for r in report.rows if "le(0)" in r.codec})
        err = float((mean - exact).norm() / exact.norm())
        print(f"{args.model} {codec} ({', '.join(labels)}): saved {report.saved_bytes_after / 1024:.0f} KiB; "
              f"one draw cosine {cos:.4f}; mean of {args.draws} draws: {err:.4f} relative error")


if __name__ == "__main__":
    main()
