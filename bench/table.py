"""Regenerate the README's results table from bench/results/*.json.

    python bench/table.py          # rewrite the table in README.md
    python bench/table.py --check  # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def render(results_dir: pathlib.Path = ROOT / "bench" / "results") -> str:
    files = [(path, json.loads(path.read_text())) for path in sorted(results_dir.glob("*.json"))]
    speed = [(p, d) for p, d in files if "results" in d]
    fidelity = [(p, d) for p, d in files if "fidelity" in d]
    peak = [(p, d) for p, d in files if "peak" in d]
    parts = [_speed_table(speed) if speed else "_No current GPU speed/memory results: `bench/bench_step.py` writes them._"]
    if peak:
        parts.append(_peak_table(peak))
    if fidelity:
        parts.append(_fidelity_table(fidelity))
    return "\n\n".join(parts)


def _where(env: dict) -> str:
    return f"{env.get('gpu', env.get('cpu', env['device']))}, torch {env['torch']}"


def _speed_table(files) -> str:
    lines = [
        "| model | variant | items/s | × torch.compile | activation GiB | saved GiB (before→after) | device, torch | file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, data in files:
        base = {r["model"]: r["items_per_s"] for r in data["results"] if r["variant"] == "torch.compile"}
        for r in data["results"]:
            rel = f"{r['items_per_s'] / base[r['model']]:.2f}" if r["model"] in base else "–"
            saved = (
                f"{r['saved_gib_before']:.2f}→{r['saved_gib_after']:.2f}"
                if r.get("saved_gib_before") is not None
                else "–"
            )
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['items_per_s']:,.0f} | {rel} | "
                f"{r['activation_gib']:.2f} | {saved} | {_where(data['environment'])} | `{path.name}` |"
            )
    return "\n".join(lines)


def _peak_table(files) -> str:
    lines = []
    for path, data in files:
        lines += [
            f"Predicted vs measured step peak (`{path.name}`, {_where(data['environment'])}; `{data['command']}`; "
            "GiB above the steady allocation):",
            "",
            "| model | backend | codec | predicted | measured | error | max reserved |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["peak"]:
            lines.append(
                f"| {r['model']} | {r['backend']} | {r['codec']} | {r['predicted_gib']:.2f} | "
                f"{r['measured_gib']:.2f} | {r['error']:+.1%} | {r['reserved_gib']:.2f} |"
            )
        if data.get("notes"):
            lines += ["", f"_{data['notes']}_"]
    return "\n".join(lines)


def _fidelity_table(files) -> str:
    lines = []
    for path, data in files:
        rows = data["fidelity"]
        codecs = list(dict.fromkeys(r["codec"] for r in rows))
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        value = {(r["task"], r["codec"]): r["value"] for r in rows}
        lines.append(f"Fidelity (`{path.name}`, {_where(data['environment'])}; `{data['command']}`):")
        lines.append("")
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
            print("README.md results table is out of date: run python bench/table.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
