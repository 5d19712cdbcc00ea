"""Where compile time goes: the first training step, and the part of it fxcompress's own passes take.

    python bench/compile_time.py --models resnet transformer --codecs none int4
    python bench/compile_time.py --models resnet50 --batch 8 --codecs none int4   # needs torchvision

Each (model, codec) runs in a fresh process on the eager backend (so Inductor's
code generation is not part of it) and reports the first step's wall time and
the seconds spent inside fxcompress's partitioner (PyTorch's partitioner, then
fxcompress's plan and rewrite), with the number of codec traces made and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import fxcompress  # noqa: E402
from common import build, run_child  # noqa: E402


def run_one(model: str, codec: str, batch: int | None) -> dict:
    from fxcompress import capture
    from fxcompress.passes import splice

    work = build(model, "cpu", batch)
    cm = fxcompress.compile(work.model, fxcompress.CompressConfig(codec=codec), backend="eager")
    spent = [0.0]
    original = capture.Partitioner.__call__

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    capture.Partitioner.__call__ = timed
    t0 = time.perf_counter()
    work.loss_fn(cm(*work.inputs)).backward()
    first = time.perf_counter() - t0
    return {"model": model, "codec": codec, "first_step_s": first, "partitioner_s": spent[0],
            "traces": splice.TRACE_COUNTS["made"], "traces_reused": splice.TRACE_COUNTS["reused"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet", "transformer"])
    p.add_argument("--codecs", nargs="+", default=["none", "int4"])
    p.add_argument("--batch", type=int)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.batch)), flush=True)
        return
    print(f"{'model':<12} {'codec':<9} {'first step s':>12} {'partitioner s':>13} {'traces':>7} {'reused':>7}")
    for model in args.models:
        for codec in args.codecs:
            cmd = [sys.executable, __file__, "--one", model, codec] + (["--batch", str(args.batch)] if args.batch else [])
            r = run_child(cmd, f"{model} / {codec}")
            if r:
                print(f"{model:<12} {codec:<9} {r['first_step_s']:>12.1f} {r['partitioner_s']:>13.1f} "
                      f"{r['traces']:>7} {r['traces_reused']:>7}", flush=True)


if __name__ == "__main__":
    main()
