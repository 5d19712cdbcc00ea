"""Where a compiled training step's GPU memory peak comes from, and which kernels take its time.

    python bench/where_peak.py --model resnet50 --variant "fxcompress int4" --batch 64 --out-dir OUT
    python bench/where_peak.py --model gpt2 --variant "fxcompress none" --backend eager --batch 8

Runs warm-up steps, then one step under ``torch.cuda.memory._record_memory_history``
and finds the moment of the highest allocated bytes: the allocations live then,
largest first, each with the line of (generated) code that made it. Then a few
steps under ``torch.profiler``: the kernels with the most GPU time. With
``--out-dir`` the generated Inductor code of the step is written there too.
"""
from __future__ import annotations

import argparse
import linecache
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from bench_step import OPTIMIZER, wrap_for  # noqa: E402
from common import GiB, build, make_optimizer  # noqa: E402


def live_at_peak(trace: list[dict]) -> tuple[int, int, list[dict]]:
    """(peak bytes, index of the event that reached it, allocations live then)."""
    live: dict[int, dict] = {}
    current = peak = peak_at = 0
    peak_live: list[dict] = []
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_at = current, i
                peak_live = list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak, peak_at, peak_live


def where(event: dict) -> str:
    """The innermost frame in generated or user code, with its source line."""
    for frame in event.get("frames", []):
        name = frame.get("filename", "")
        if "/torch/" in name and "torchinductor" not in name:
            continue  # PyTorch's own frames: look for the generated or user code that called them
        text = linecache.getline(name, frame.get("line", 0)).strip()
        return f"{os.path.basename(name)}:{frame.get('line')} {text[:110]}"
    return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--variant", default="fxcompress int4")
    p.add_argument("--backend", choices=["inductor", "eager"], help="for fxcompress variants (default: inductor)")
    p.add_argument("--batch", type=int)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out-dir")
    args = p.parse_args()

    work = build(args.model, "cuda", args.batch)
    module = wrap_for(args.variant, args.backend)(work)
    opt = make_optimizer(list(work.model.parameters()), OPTIMIZER.get(args.model, "adamw"))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = work.loss_fn(module(*work.inputs))
        loss.backward()
        opt.step()

    if args.out_dir:
        from torch._inductor.utils import run_and_get_code

        _, codes = run_and_get_code(step)
        os.makedirs(args.out_dir, exist_ok=True)
        for i, code in enumerate(codes):
            with open(os.path.join(args.out_dir, f"code{i}.py"), "w") as f:
                f.write(code)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if isinstance(module, fxcompress.CompressedModule):
        r = fxcompress.explain(module)
        print(f"report: saved {r.saved_bytes_before / GiB:.3f} -> {r.saved_bytes_after / GiB:.3f} GiB, "
              f"predicted peak {r.predicted_peak_bytes_before / GiB:.3f} -> {r.predicted_peak_bytes_after / GiB:.3f} GiB, "
              f"{len(module.capture_log.captures())} graph(s)")

    steady = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"steady {steady / GiB:.3f} GiB, peak {torch.cuda.max_memory_allocated() / GiB:.3f} GiB "
          f"(activation {(torch.cuda.max_memory_allocated() - steady) / GiB:.3f}), "
          f"reserved {torch.cuda.max_memory_reserved() / GiB:.3f} GiB")
    peak, at, live = live_at_peak(snapshot["device_traces"][0])
    print(f"traced peak {peak / GiB:.3f} GiB above the step's start, reached at: {where(snapshot['device_traces'][0][at])}")
    by_site: dict[str, list[int]] = {}
    for event in live:
        by_site.setdefault(where(event), []).append(event["size"])
    print(f"{'GiB':>7} {'n':>4}  allocated at")
    for site, sizes in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"{sum(sizes) / GiB:>7.3f} {len(sizes):>4}  {site}")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
