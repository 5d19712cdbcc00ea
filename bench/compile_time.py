"""What the first training step costs to compile, cold, and fxcompress's own share of it.

    python bench/compile_time.py --device cuda --models resnet50 --variants plain int4 int4/triton   # a GPU
    python bench/compile_time.py --codegen triton --models resnet50 --batch 8 --repeat 3 \\
        --variants plain int4 int4/triton          # the CPU proxy (needs Triton, no GPU)
    python bench/compile_time.py --backend eager --models resnet transformer --variants none int4

Each (model, variant) runs ``--repeat`` times, each in a fresh process with empty compile
caches (Inductor's and Triton's: ``common.run_child``), so every run compiles everything, as
a user's first run does. A run times the first training step (forward and backward: capture,
partitioning, fxcompress's rewrite, Inductor's lowering and code generation, and on a device
Triton's compilation and one run) and, inside it, fxcompress's own passes (its partitioner's
time less PyTorch's partitioner's, which it calls and ``plain`` runs too; 0 for ``plain``) and
Inductor's compile of the forward graph and of the backward graph (Dynamo's own timers). The
table shows the medians of the runs and the first step's ratio to ``plain``'s (issue 6's
target: at most 1.3x ``torch.compile``).

- ``--backend inductor`` (default): ``plain`` is ``torch.compile``; other variants are
  ``fxcompress.compile(..., backend="inductor")`` with ``common.compress_config``'s specs
  (``int4``, ``int4/triton``, ``ara+int4``, ...). bf16 autocast where a GPU would use it.
- ``--codegen triton``: Inductor generates Triton kernels for the CPU and compiles none
  (``traffic.triton_codegen_only``), the forward's first launch ends the step: the CPU
  proxy of a GPU compile without Triton's own compile time, which only a device measures.
- ``--codegen triton-build``: the proxy, and each kernel, as it is generated, compiled for an
  H100 (sm_90) with Triton's compiler and the ``ptxas`` its wheel carries
  (``traffic.TritonBuild``): every config the autotuner would benchmark, one after the
  other, in the step, so the first step includes Triton's compile as a device's does, but
  serial, where a GPU machine compiles in one worker process per core; ``triton_build_s``
  is that compile's own time, ``kernels`` and ``binaries`` what it made.
- ``--backend eager``: fxcompress's eager backend (no code generation; ``plain`` is
  ``aot_eager``); the step runs, so it includes the codecs' unfused eager ops.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from common import build, compress_config, open_results, put_result, run_child  # noqa: E402


def run_one(model: str, variant: str, backend: str, codegen: str, device: str, batch: int | None) -> dict:
    """One cold first step, in this (fresh) process."""
    import traffic
    from fxcompress import capture
    from fxcompress.passes import splice

    work = build(model, device, batch)
    if variant == "plain":
        module = torch.compile(work.model, backend="inductor" if backend == "inductor" else "aot_eager")
    else:
        config = compress_config(variant, work.ara_stride, work.asa_layers)
        module = fxcompress.compile(work.model, config, backend=backend)
    spent = {"partitioner": 0.0, "base": 0.0}

    def timing(fn, key):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
        return timed

    call, base = capture.Partitioner.__call__, capture.Partitioner._base
    capture.Partitioner.__call__ = timing(call, "partitioner")
    capture.Partitioner._base = lambda self: timing(base(self), "base")  # PyTorch's partitioner, inside
    triton_build = traffic.TritonBuild() if codegen == "triton-build" else None
    proxy = traffic.triton_codegen_only(build=triton_build) if codegen.startswith("triton") else contextlib.nullcontext()
    started = time.perf_counter()
    try:
        with proxy, traffic.step_autocast(device, codegen):
            work.loss_fn(module(*work.inputs)).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except traffic._NotRun:  # NB: the proxy's first kernel launch, after both graphs were generated
        pass
    first = time.perf_counter() - started
    forward_s, backward_s = _inductor_graphs_s()
    return {"first_step_s": first, "fxcompress_s": spent["partitioner"] - spent["base"],
            "inductor_forward_s": forward_s, "inductor_backward_s": backward_s,
            "traces": splice.TRACE_COUNTS["made"], "traces_reused": splice.TRACE_COUNTS["reused"],
            "triton_build_s": triton_build and triton_build.seconds,
            "kernels": triton_build and triton_build.kernels, "binaries": triton_build and triton_build.binaries}


def _inductor_graphs_s() -> tuple[float | None, float | None]:
    """Inductor's compile of the forward graph and of the backward graph, in seconds (Dynamo's own
    timing of ``compile_fx_inner``, one entry per graph; ``None`` where it has none: the eager backend)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv")
    if "compile_fx_inner" not in names:
        return None, None
    per_graph = [float(v) for v in values[names.index("compile_fx_inner")].split(",")]
    return (per_graph + [None, None])[:2] if len(per_graph) == 2 else (None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["resnet", "transformer"])
    p.add_argument("--variants", nargs="+", default=["plain", "int4", "int4/triton"])
    p.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--codegen", choices=["run", "triton", "triton-build"], default="run",
                   help="run: compile (on a device, Triton too) and run; triton: the CPU proxy, generated only; "
                        "triton-build: the proxy, each kernel also compiled for an H100 (sm_90)")
    p.add_argument("--batch", type=int)
    p.add_argument("--repeat", type=int, default=1, help="cold runs per variant (the median is shown)")
    p.add_argument("--timeout", type=float, help="seconds per run")
    p.add_argument("--out", help="results JSON to add rows to (key 'compile_time')")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.codegen.startswith("triton") and (args.device != "cpu" or args.backend != "inductor"):
        p.error("--codegen triton is Inductor's code generation for the CPU: --backend inductor --device cpu")
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.backend, args.codegen, args.device, args.batch)), flush=True)
        return
    results = open_results(args.out, "compile_time", args.device, " ".join(["python", *sys.argv]))
    print(f"{'model':<12} {'variant':<14} {'first step s':>12} {'x plain':>8} {'fxcompress s':>12} "
          f"{'inductor fw / bw s':>18} {'traces':>7} {'reused':>7}  runs")
    for model in args.models:
        plain = None
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--one", model, variant, "--backend", args.backend,
                   "--codegen", args.codegen, "--device", args.device]
            cmd += ["--batch", str(args.batch)] if args.batch else []
            runs = [r for r in (run_child(cmd, f"{model} / {variant}", args.timeout) for _ in range(args.repeat)) if r]
            if not runs:
                continue
            first = statistics.median(r["first_step_s"] for r in runs)
            plain = first if variant == "plain" else plain
            row = {"model": model, "variant": variant, "batch": args.batch, "backend": args.backend,
                   "codegen": args.codegen, "first_step_s": first,
                   "fxcompress_s": statistics.median(r["fxcompress_s"] for r in runs),
                   "inductor_s": _medians(runs, "inductor_forward_s", "inductor_backward_s"),
                   "runs_s": [r["first_step_s"] for r in runs], "traces": runs[0]["traces"],
                   "traces_reused": runs[0]["traces_reused"]}
            if args.codegen == "triton-build":
                row.update(triton_build_s=statistics.median(r["triton_build_s"] for r in runs),
                           kernels=runs[0]["kernels"], binaries=runs[0]["binaries"])
            ratio = f"{first / plain:>8.2f}" if plain else f"{'':>8}"
            print(f"{model:<12} {variant:<14} {first:>12.1f} {ratio} {row['fxcompress_s']:>12.1f} "
                  f"{_pair(row['inductor_s']):>18} {row['traces']:>7} {row['traces_reused']:>7}  "
                  f"{', '.join(f'{s:.1f}' for s in row['runs_s'])}"
                  + (f"  Triton build {row['triton_build_s']:.1f} s, {row['kernels']} kernels, "
                     f"{row['binaries']} binaries" if "kernels" in row else ""), flush=True)
            put_result(args.out, results, "compile_time", row, ("model", "variant", "batch", "backend", "codegen"))


def _medians(runs: list[dict], *keys: str) -> list[float] | None:
    """Per key, the median over the runs; ``None`` if a run lacks it."""
    if any(r[k] is None for r in runs for k in keys):
        return None
    return [statistics.median(r[k] for r in runs) for k in keys]


def _pair(values: list[float] | None) -> str:
    return "–" if values is None else " / ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
