"""Regenerate the README's results section from bench/results/*.json (no hand-copied numbers).

    python bench/report.py          # rewrite the section between the results markers in README.md
    python bench/report.py --check  # exit 1 if README.md is out of date

Each results file names its commands, device and torch version; the section
shows every file of ``bench/results`` (not of its subfolders): step
benchmarks (``bench/bench_step.py``) with the issue's targets checked,
predicted against measured peaks (``bench/peak.py``), the memory traffic of
Inductor's kernels by role (``bench/traffic.py``), the short CPU fidelity
runs (``bench/fidelity.py``) and the long ones with their curves
(``bench/fidelity_suite.py``), and cold compile times (``bench/compile_time.py``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CAP_GIB = 40  # the memory cap of the largest-batch column (an A100-40GB)

# The targets the project competes on (issue 6): variant -> (least activation reduction
# against torch.compile, least throughput ratio); GPT-2's reduction is of the blocks' saved bytes.
TARGETS = {
    "resnet50": {"fxcompress int4": (3.5, 0.90), "fxcompress int2": (6.0, 0.85)},
    "gpt2": {"fxcompress int8": (1.8, 0.90), "fxcompress int4": (3.0, 0.90)},
}
COMPILE_TARGET = 1.3  # fxcompress's compile time against torch.compile's


def render(results_dir: pathlib.Path = RESULTS) -> str:
    files = [(path, json.loads(path.read_text())) for path in sorted(results_dir.glob("*.json"))]
    parts = [_speed(p, d) for p, d in files if "results" in d]
    if not parts:
        parts = ["_No current GPU speed/memory results: `bench/bench_step.py` writes them._"]
    parts += [_peak(p, d) for p, d in files if "peak" in d]
    parts += [_saved(p, d) for p, d in files if "saved" in d]
    parts += [_coverage(p, d) for p, d in files if "coverage" in d]
    parts += [_traffic(p, d) for p, d in files if "traffic" in d]
    parts += [_compile_time(p, d) for p, d in files if "compile_time" in d]
    parts += [_curves(p, d) for p, d in files if "curves" in d]
    parts += [_fidelity(p, d) for p, d in files if "fidelity" in d]
    return "\n\n".join(parts)


def _where(env: dict) -> str:
    date = f", {env['date']}" if "date" in env else ""
    return f"{env.get('gpu', env.get('cpu', env['device']))}, torch {env['torch']}{date}"


def _commands(data: dict) -> str:
    cmds = data.get("commands") or [data["command"]]
    return "; ".join(f"`{c}`" for c in cmds)


def _max_batch(r: dict) -> str:
    if r["activation_gib"] <= 0:
        return "–"
    return f"{int(r['batch'] * (CAP_GIB - r['steady_gib']) / r['activation_gib']):,}"


def _speed(path: pathlib.Path, data: dict) -> str:
    rows = data["results"]
    base = {r["model"]: r for r in rows if r["variant"] == "torch.compile"}
    lines = [
        f"Training step (`{path.name}`, {_where(data['environment'])}; {_commands(data)}). Median step time "
        f"({'CUDA events' if 'gpu' in data['environment'] else 'perf_counter'}) after warm-up; activation = peak minus the steady allocation; the largest batch "
        f"under {CAP_GIB} GiB is extrapolated from the measured activation bytes per sample (gradients "
        f"counted as per-sample too, so it errs low):",
        "",
        "| model | variant | batch | items/s | × torch.compile | peak GiB | activation GiB | × less activation "
        f"| saved GiB (before→after) | compile s | max batch @{CAP_GIB} GiB | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["model"])
        speed = f"{r['items_per_s'] / b['items_per_s']:.2f}" if b else "–"
        less = f"{b['activation_gib'] / r['activation_gib']:.2f}" if b and r["activation_gib"] > 0 else "–"
        saved = f"{r['saved_gib_before']:.2f}→{r['saved_gib_after']:.2f}" if r.get("saved_gib_before") is not None else "–"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch']} | {r['items_per_s']:,.0f} | {speed} | {r['peak_gib']:.2f} | "
            f"{r['activation_gib']:.2f} | {less} | {saved} | {r['compile_s']:.0f} | {_max_batch(r)} | {r.get('commit', '–')} |"
        )
    verdicts = _targets(rows, base)
    if verdicts:
        lines += ["", "Targets (issue 6):", "", *verdicts]
    return "\n".join(lines)


def _targets(rows: list[dict], base: dict) -> list[str]:
    out = []
    by_key = {(r["model"], r["variant"]): r for r in rows}
    for model, targets in TARGETS.items():
        b = base.get(model)
        for variant, (want_less, want_speed) in targets.items():
            r = by_key.get((model, variant))
            if b is None or r is None or r["activation_gib"] <= 0:
                continue
            if model == "gpt2":
                if r.get("blocks_saved_gib_after") in (None, 0) or not r.get("blocks_saved_gib_before"):
                    continue
                less = r["blocks_saved_gib_before"] / r["blocks_saved_gib_after"]
                what = "less saved in the blocks"
            else:
                less, what = b["activation_gib"] / r["activation_gib"], "less activation memory"
            speed = r["items_per_s"] / b["items_per_s"]
            ok = less >= want_less and speed >= want_speed
            out.append(
                f"- {model} {variant}: {less:.2f}× {what} (target {want_less}×), {speed:.2f}× torch.compile's "
                f"throughput (target {want_speed}×): **{'met' if ok else 'missed'}**"
            )
    for model, b in sorted(base.items()):
        slow = [r for r in rows if r["model"] == model and r["variant"].startswith("fxcompress ")]
        if slow and b["compile_s"] > 0:
            worst = max(slow, key=lambda r: r["compile_s"])
            ratio = worst["compile_s"] / b["compile_s"]
            out.append(
                f"- {model} compile time: at most {ratio:.2f}× torch.compile's ({worst['variant']}; target "
                f"{COMPILE_TARGET}×): **{'met' if ratio <= COMPILE_TARGET else 'missed'}**"
            )
    return out


def _peak(path: pathlib.Path, data: dict) -> str:
    lines = [
        f"Predicted vs measured step peak (`{path.name}`, {_where(data['environment'])}; {_commands(data)}; "
        "GiB above the steady allocation"
        + ("" if "gpu" in data["environment"] else "; fp32, measured = the peak of the live bytes the profiler's "
           "allocator events add up to, the CPU allocator caching nothing; backend `inductor/triton`: the Triton "
           "code Inductor generates for a GPU, bf16 autocast, its kernels launched as no-ops, its buffers real")
        + "):",
        "",
        "| model | batch | backend | codec | predicted | measured | error | max reserved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["peak"]:
        batch = r.get("batch") or {"resnet50": 64, "gpt2": 8}.get(r["model"], "–")  # NB: older rows: the defaults
        lines.append(
            f"| {r['model']} | {batch} | {r['backend']}{'/triton' if r.get('codegen') == 'triton' else ''} | "
            f"{r['codec']} | {r['predicted_gib']:.3f} | "
            f"{r['measured_gib']:.3f} | {r['error']:+.1%} | "
            f"{'–' if r.get('device') == 'cpu' else format(r['reserved_gib'], '.2f')} |"
        )
    if data.get("notes"):
        lines += ["", f"_{data['notes']}_"]
    return "\n".join(lines)


def _saved(path: pathlib.Path, data: dict) -> str:
    """``bench/saved.py``: bytes the captured graphs save, per model and codec (CPU capture, no GPU)."""
    lines = [
        f"Saved bytes from the captured graphs, CPU capture of the benchmark models at a small batch "
        f"(`{path.name}`, {_where(data['environment'])}; {_commands(data)}; eager backend, bf16 autocast): "
        "activations = all saved tensors but autocast's bf16 weight copies (exact, not growing with the batch); "
        "× = before / after the codec, in that capture (a storage that several saved views share counts once, "
        "under every codec). Not a GPU's measured memory:",
        "",
        "| model | batch | dropout | codec | all GiB | activations GiB | × | in the blocks GiB | × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["saved"]:
        (a0, a1), (w0, w1), (b0, b1) = r["gib"], r["activations_gib"], r["block_activations_gib"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {'on' if r['dropout'] else 'off'} | {r['codec']} | "
            f"{a0:.3f} → {a1:.3f} | {w0:.3f} → {w1:.3f} | {w0 / w1:.2f} | {b0:.3f} → {b1:.3f} | "
            f"{b0 / b1 if b1 else 0:.2f} |"
        )
    return "\n".join(lines)


def _coverage(path: pathlib.Path, data: dict) -> str:
    """``bench/architectures.py``: the share of each architecture's saved activations left uncoded, and why."""
    lines = [
        f"Coverage across architectures (`{path.name}`, {_where(data['environment'])}; {_commands(data)}; "
        "fp32, small sizes: what each architecture's graphs save and what fxcompress does to each, "
        "not memory at scale). Activations = saved tensors but graph inputs and tensors made from "
        "parameters alone; uncoded = their share stored as they are, with the largest reasons; grad cos = "
        "the cosine similarity of the step's weight gradients to the plain model's, run eagerly, dropout and stochastic depth off "
        "(one step at these small batches: a check that the step is sound, stochastic rounding's noise included; "
        "how training ends is the fidelity runs' measure; rows accumulate over runs, each names the commit it measured):",
        "",
        "| model | size | backend | codec | activations MiB | × | uncoded | grad cos | largest uncoded | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["coverage"]:
        before, after = r["saved_mib"]
        why = "; ".join(f"{u['share']:.1%} {u['reason']} ({u['tensors']})" for u in r["uncoded"])
        lines.append(
            f"| {r['model']} | {r['size']} | {r['backend']} | {r['codec']} | {before:.2f} → {after:.2f} | "
            f"{before / after if after else 0:.2f} | {r['uncoded_share']:.1%} | "
            f"{'–' if r.get('grad_cosine') is None else format(r['grad_cosine'], '.5f')} | {why.replace('|', '/')} | {r.get('commit', '–')} |"
        )
    return "\n".join(lines)


_FIRST = "first_step_s"  # traffic rows since 2026-12-01: the compiling step's wall time


def _traffic(path: pathlib.Path, data: dict) -> str:
    triton = any(r.get("codegen") == "triton" for r in data["traffic"])
    what = ("the Triton kernels Inductor generates for the step (for the CPU device, generated but not run: "
            "Triton's fusion seen without a GPU, under the GPU's limits on inlining)" if triton else "the compiled step")
    lines = [
        f"Memory traffic of {what}, by kernel role (`{path.name}`, {_where(data['environment'])}; "
        f"{_commands(data)}): Inductor's own count of the bytes each kernel reads and writes, after fusion; "
        "`encode`/`decode` are kernels of fxcompress's codecs alone, `+encode`/`+decode` are codec code "
        "fused into the model's kernels:",
        "",
        "| model | batch | variant | kernels fw / bw | MiB moved fw / bw | × plain | encode kernels (MiB) "
        "| +encode | decode kernels (MiB) | +decode | first step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    steps: dict[tuple, list[dict]] = {}
    for r in data["traffic"]:
        steps.setdefault((r["model"], r["batch"], r["variant"]), []).append(r)
    plain = {(m, b): sum(r["gib"] for r in rs) for (m, b, v), rs in steps.items() if v == "plain"}
    marked = False
    for (model, batch, variant), rs in steps.items():
        fw = [r for r in rs if r["pass"] == "forward"]
        bw = [r for r in rs if r["pass"] == "backward"]

        def total(part, key):
            return sum(r[key] for r in part)

        def role(name, key):
            return sum(r["by_role"].get(name, {}).get(key, 0) for r in rs)

        def fused(name):  # model kernels with codec code of kind `name` fused in
            return sum(v["kernels"] for r in rs for k, v in r["by_role"].items() if {"model", name} <= set(k.split("+")))

        base = plain.get((model, batch))
        ratio = f"{total(rs, 'gib') / base:.2f}" if base else "–"
        mark = "" if any(_FIRST in r for r in rs) else " †"
        marked = marked or bool(mark)
        lines.append(
            f"| {model} | {batch} | {variant} | {total(fw, 'kernels')} / {total(bw, 'kernels')}{mark} | "
            f"{total(fw, 'gib') * 1024:.1f} / {total(bw, 'gib') * 1024:.1f} | {ratio} | "
            f"{role('encode', 'kernels')} ({role('encode', 'gib') * 1024:.1f}) | {fused('encode')} | "
            f"{role('decode', 'kernels')} ({role('decode', 'gib') * 1024:.1f}) | {fused('decode')} | "
            f"{next((f'{r[_FIRST]:.0f}' for r in rs if _FIRST in r), '–')} |"
        )

    if marked:
        lines += ["", "† Counted before 2026-12-01, when each output of a multi-output extern call (convolution "
                  "backward's gradients) was counted as a kernel of its own."]
    timed = [(key, r) for key, rs in steps.items() for r in rs if "ms" in r]
    if timed:
        lines += [
            "",
            "Where the time goes (`--time`: device milliseconds per step under the profiler, by the role of the "
            "kernels Inductor generated, and the bandwidth they reached; `extern` is cuDNN's and cuBLAS's):",
            "",
            "| model | batch | variant | pass | ms | ms by role (GB/s) |",
            "|---|---|---|---|---|---|",
        ]
        for (model, batch, variant), r in timed:
            parts = ", ".join(f"{role} {ms:.2f}" + (f" ({r['gb_s'][role]:,.0f})" if role in r["gb_s"] else "")
                              for role, ms in r["ms"].items())
            lines.append(f"| {model} | {batch} | {variant} | {r['pass']} | {sum(r['ms'].values()):.2f} | {parts} |")
    return "\n".join(lines)


def _compile_time(path: pathlib.Path, data: dict) -> str:
    rows = data["compile_time"]
    proxy = any(r["codegen"] == "triton" for r in rows)
    built = any(r["codegen"] == "triton-build" for r in rows)
    what = (" (the CPU proxy, `inductor (Triton proxy)`: Inductor generates Triton kernels for the CPU and "
            "compiles none, so Triton's own compile is not in it)" if proxy else "")
    lines = [
        f"Compile time{what}: the first training step, cold (each run a fresh process with empty Inductor "
        f"and Triton caches), median of the runs; `fxcompress s` is the time of fxcompress's own passes in it, "
        f"`Inductor fw / bw s` Inductor's compile of the forward and of the backward graph "
        f"(`{path.name}`, {_where(data['environment'])}; {_commands(data)}).",
    ]
    if built:
        lines[-1] += (" `inductor (Triton proxy + H100 build)` is the proxy with each kernel also compiled for an "
                      "H100 (sm_90) on the CPU by Triton and its `ptxas`, every autotuning config, one after the "
                      "other; `Triton s` is that compile, part of `Inductor fw / bw s` (a GPU machine spreads it "
                      "over its cores).")
    lines[-1] += f" Target (issue 6): at most {COMPILE_TARGET}× `torch.compile`'s first step."
    lines += [
        "",
        "| model | batch | backend | variant | first step s | × plain | fxcompress s | Inductor fw / bw s | "
        "Triton s (kernels) | runs s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(r["model"], r["batch"], r["backend"], r["codegen"]): r["first_step_s"]
             for r in rows if r["variant"] == "plain"}
    for r in rows:
        base = plain.get((r["model"], r["batch"], r["backend"], r["codegen"]))
        ratio = f"{r['first_step_s'] / base:.2f}" if base else "–"
        backend = r["backend"] + _PROXY_NAMES.get(r["codegen"], "")
        runs = ", ".join(f"{s:.1f}" for s in r["runs_s"])
        graphs = " / ".join(f"{v:.1f}" for v in r["inductor_s"]) if r.get("inductor_s") else "–"
        build = f"{r['triton_build_s']:.1f} ({r['kernels']})" if r.get("kernels") else "–"
        lines.append(f"| {r['model']} | {r['batch'] or 'default'} | {backend} | {r['variant']} | "
                     f"{r['first_step_s']:.1f} | {ratio} | {r['fxcompress_s']:.1f} | {graphs} | {build} | {runs} |")
    return "\n".join(lines)


_PROXY_NAMES = {"triton": " (Triton proxy)", "triton-build": " (Triton proxy + H100 build)"}


def _curves(path: pathlib.Path, data: dict) -> str:
    rows = data["curves"]
    lines = [f"Fidelity, full schedules (`{path.name}`, {_where(data['environment'])}; {_commands(data)}):", ""]
    lines += ["| task | metric | variant | final | vs exact | schedule |", "|---|---|---|---|---|---|"]
    exact = {r["task"]: r["value"] for r in rows if r["variant"] == "none"}
    for r in rows:
        ref = exact.get(r["task"])
        if ref is None:
            delta = "–"
        elif "accuracy" in r["metric"]:
            delta = f"{r['value'] - ref:+.2f} points"
        else:
            delta = f"{(r['value'] - ref) / ref:+.2%}"
        schedule = f"{r['steps']} steps" if "steps" in r else f"{r['epochs']} epochs, width {r['width']}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['variant']} | {r['value']:.4g} | {delta} | {schedule} |")
    png = path.with_suffix(".png")
    if png.exists():
        lines += ["", f"![validation curves per variant]({png.relative_to(ROOT).as_posix()})"]
    return "\n".join(lines)


def _fidelity(path: pathlib.Path, data: dict) -> str:
    rows = data["fidelity"]
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    value = {(r["task"], r["codec"]): r["value"] for r in rows}
    lines = [f"Fidelity, short runs (`{path.name}`, {_where(data['environment'])}; {_commands(data)}):", ""]
    lines.append("| task | " + " | ".join(codecs) + " |")
    lines.append("|---|" + "---|" * len(codecs))
    for task in tasks:
        cells = [
            "–" if (task, c) not in value else f"{value[(task, c)]:.2f}" if "accuracy" in task else f"{value[(task, c)]:.4f}"
            for c in codecs
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def updated_readme(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = updated_readme(text)
    if args.check:
        if new != text:
            print("README.md results section is out of date: run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
