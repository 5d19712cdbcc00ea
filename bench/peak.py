"""Predicted against measured step peak: does fxcompress's liveness know where memory goes?

    python bench/peak.py --device cuda --out bench/results/peak_h100.json

For each model, backend and codec (each run in its own process): compile with
fxcompress, train two warm-up steps, then measure one forward + backward.
``measured`` is ``torch.cuda.max_memory_allocated()`` during that forward +
backward minus what was allocated just before it (weights, optimizer state,
the batch; gradients are set to None first, so they are part of the step, as
in the prediction). ``predicted`` is ``explain(cm).predicted_peak_bytes_after``
(``_before`` is the same graph before the rewrite). The loss is computed inside
the compiled module so that the whole step is in the captured graphs.
``max_memory_reserved`` is recorded too: reserved minus allocated is the
allocator's fragmentation and caching. On a CPU (``--device cpu``, fp32, no
autocast) ``measured`` is the peak of the live bytes the profiler's
allocator events add up to (:func:`cpu_peak`); nothing is reserved there.

With ``backend="eager"`` the rewritten graphs run node by node as predicted;
with ``backend="inductor"`` the plan leaves out the elementwise values
Inductor computes inside their readers' kernels (``analyze_liveness(...,
inductor=True)``, with Inductor's rules for what it writes out) but not its
other choices, so its measured peak is shown beside the prediction, not checked.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fxcompress  # noqa: E402
import traffic  # noqa: E402
from common import GiB, build, open_results, put_result, run_child  # noqa: E402

BATCH = {"resnet50": 64, "gpt2": 8}  # the sizes: ResNet-50 batch 64, GPT-2 8 x 1024
TOLERANCE = 0.10
# NB: held by the module: a context manager entered and dropped is closed (its patches undone) at once
_PROXY = contextlib.ExitStack()


@dataclasses.dataclass
class PeakRow:
    model: str
    backend: str
    codec: str
    predicted_before_gib: float
    predicted_gib: float
    measured_gib: float
    reserved_gib: float
    steady_gib: float
    graphs: int
    batch: int = 0
    device: str = ""
    codegen: str = "run"  # "triton": Inductor's Triton code on the CPU, kernels as no-ops (--codegen)

    @property
    def error(self) -> float:
        if not self.measured_gib:
            return float("nan")
        return (self.predicted_gib - self.measured_gib) / self.measured_gib


class WithLoss(nn.Module):
    """The model and its loss in one module, so one captured graph holds the whole step."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *inputs):
        return self.loss_fn(self.model(*inputs))


def cpu_peak(fn) -> int:
    """The most bytes ``fn()`` holds allocated on the CPU at once, above what was allocated before it.

    From the profiler's allocator events (``profile_memory``): each allocation and free, in time
    order, summed. The CPU allocator caches nothing, so this is the live bytes' peak, the CPU's
    ``max_memory_allocated() - memory_allocated()``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = top = 0
    for e in events:
        live += e.nbytes()
        top = max(top, live)
    return top


def run_one(model_name: str, backend: str, codec: str, device: str, batch: int | None = None,
            codegen: str = "run") -> PeakRow:
    torch.manual_seed(0)
    work = build(model_name, device, batch or BATCH.get(model_name))
    cm = fxcompress.compile(WithLoss(work.model, work.loss_fn), fxcompress.CompressConfig(codec=codec), backend=backend)
    opt = torch.optim.SGD(work.model.parameters(), lr=1e-4)
    cuda = device.startswith("cuda")
    if codegen == "triton":  # NB: for the whole process: the backward compiles at the first step
        _PROXY.enter_context(traffic.triton_codegen_only(run_empty=True))

    def forward_backward():
        with traffic.step_autocast(device, codegen):
            loss = cm(*work.inputs)
        loss.backward()

    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        forward_backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    steady = peak = reserved = 0
    if cuda:
        torch.cuda.synchronize()
        steady = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        peak = cpu_peak(forward_backward)
    report = fxcompress.explain(cm)
    return PeakRow(
        model_name, backend, codec,
        report.predicted_peak_bytes_before / GiB, report.predicted_peak_bytes_after / GiB,
        (peak - steady) / GiB, reserved / GiB, steady / GiB, len(cm.capture_log.captures()), work.batch,
        "cuda" if cuda else "cpu", codegen,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    p.add_argument("--backends", nargs="+", default=["eager", "inductor"])
    p.add_argument("--codecs", nargs="+", default=["none", "int4"])
    p.add_argument("--batch", type=int, help="instead of the issue's (ResNet-50 64, GPT-2 8)")
    p.add_argument("--codegen", choices=["run", "triton"], default="run",
                   help="triton (--device cpu, --backends inductor): the Triton code a GPU would run, its kernels "
                        "launched as no-ops, bf16 autocast; the buffers it allocates and frees are real")
    p.add_argument("--out")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "BACKEND", "CODEC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.codegen == "triton" and (args.device != "cpu" or args.backends != ["inductor"]):
        p.error("--codegen triton: Inductor's Triton code for the CPU device (--device cpu --backends inductor)")
    if args.one:
        row = run_one(*args.one, args.device, args.batch, args.codegen)
        if args.codegen == "triton" and not traffic._Empty.launches:
            raise SystemExit("--codegen triton: no Triton kernel was launched; the proxy was not in force")
        print("RESULT " + json.dumps(dataclasses.asdict(row)), flush=True)
        return

    rows: list[PeakRow] = []
    for model in args.models:
        for backend in args.backends:
            for codec in args.codecs:
                print(f"[peak] {model} / {backend} / {codec} ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--device", args.device, "--one", model, backend, codec]
                cmd += ["--batch", str(args.batch)] if args.batch else []
                cmd += ["--codegen", args.codegen, "--backends", backend]
                result = run_child(cmd, f"[peak] {model} / {backend} / {codec}")
                if result is not None:
                    rows.append(PeakRow(**result))

    print(f"\n{'model':<9} {'backend':<9} {'codec':<6} {'predicted':>9} {'measured':>9} {'error':>7} "
          f"{'reserved':>9} {'graphs':>6}   (GiB; predicted before rewrite in brackets)")
    for r in rows:
        verdict = "" if r.backend != "eager" else ("  ok" if abs(r.error) <= TOLERANCE else "  OVER 10%")
        print(f"{r.model:<9} {r.backend:<9} {r.codec:<6} {r.predicted_gib:>9.3f} {r.measured_gib:>9.3f} "
              f"{r.error:>+7.1%} {r.reserved_gib:>9.3f} {r.graphs:>6}   [{r.predicted_before_gib:.3f}]{verdict}")
    if args.out:  # NB: rows accumulate across runs (a run replaces its own), e.g. one batch per model on a CPU
        data = open_results(args.out, "peak", args.device, " ".join([os.path.relpath(__file__)] + sys.argv[1:]))
        for old in data["peak"]:
            old.setdefault("codegen", "run")  # NB: rows from before --codegen
        for r in rows:
            put_result(args.out, data, "peak", dict(dataclasses.asdict(r), error=r.error),
                       ("model", "backend", "codec", "codegen", "batch"))


if __name__ == "__main__":
    main()
