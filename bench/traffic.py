"""What Inductor generates for a compressed step: kernels and bytes moved, by role.

    python bench/traffic.py --models resnet --batch 32 --variants plain int4 int2       # CPU
    python bench/traffic.py --device cuda --models resnet50 --variants plain int4 int2  # GPU

One training step per variant, compiled with Inductor (its FX graph cache off,
so every graph is generated). After Inductor's fusion, each kernel (a scheduler
node: a fused group of ops, or an extern call such as a convolution) is
classed by the fxcompress roles of the FX nodes it was made from: ``model``
(untagged), ``encode``, ``decode``, or a fused mix such as ``model+encode``
(an encoder fused into the kernel that produces its input). Bytes are
Inductor's own count of each kernel's buffer reads and writes
(``get_read_write_buffers_sizes``, what its ``inductor_metrics`` log sums), so
``model+encode`` bytes include the producer's own traffic. ``plain`` is
``torch.compile`` of the same model. This is an accounting of memory traffic,
not a timing: ``bench/bench_step.py`` times the step.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from common import GiB, build, compress_config, open_results, put_result  # noqa: E402
from fxcompress.ir import META_KEY  # noqa: E402


def graph_roles(graph) -> dict:
    """Each FX node's fxcompress role: its tag's, or for an untagged node that only codec code of
    one role reads, that role (Inductor's pass that replaces ``rand`` with its own seeded random
    ops drops the tags); anything else is ``model``. Users come after producers, so one reverse pass."""
    roles = {}
    for node in reversed(graph.nodes):
        tag = node.meta.get(META_KEY)
        users = {roles[u] for u in node.users}
        roles[node] = tag["role"] if tag else users.pop() if len(users) == 1 and "model" not in users else "model"
    return roles


def kernel_role(snode, memo: dict) -> str:
    """``model``, ``encode``, ``decode``, ``alias``, ``derived`` or a ``+``-joined mix, from the origins' roles.
    ``memo`` holds :func:`graph_roles` per FX graph."""
    roles = set()
    for part in snode.get_nodes():
        for origin in (part.node.get_origins() if part.node is not None else ()):
            if origin.graph not in memo:
                memo[origin.graph] = graph_roles(origin.graph)
            roles.add(memo[origin.graph][origin])
    return "+".join(sorted(roles, key=["model", "encode", "decode", "alias", "derived"].index)) or "model"


def traffic(model_name: str, variant: str, device: str, batch: int | None) -> list[dict]:
    """One step of ``variant`` (``plain`` or an fxcompress spec); a row per compiled graph."""
    from torch._inductor.graph import GraphLowering

    torch._dynamo.reset()
    torch._inductor.config.fx_graph_cache = False
    graphs = []
    original = GraphLowering.codegen

    def spy(self):
        out = original(self)
        by_role, memo = collections.defaultdict(lambda: [0, 0]), {}
        for snode in self.scheduler.nodes:
            entry = by_role[kernel_role(snode, memo)]
            entry[0] += 1
            entry[1] += snode.get_read_write_buffers_sizes()
        graphs.append((self.is_backward, dict(by_role)))
        return out

    work = build(model_name, device, batch)
    if variant == "plain":
        module = torch.compile(work.model)
    else:
        module = fxcompress.compile(work.model, compress_config(variant, work.ara_stride, work.asa_layers),
                                    backend="inductor")
    GraphLowering.codegen = spy
    try:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = work.loss_fn(module(*work.inputs))
        loss.backward()
    finally:
        GraphLowering.codegen = original
    rows = []
    for i, (backward, by_role) in enumerate(graphs):
        rows.append({
            "model": model_name, "variant": variant, "batch": work.batch, "graph": i,
            "pass": "backward" if backward else "forward",
            "kernels": sum(k for k, _ in by_role.values()),
            "gib": sum(b for _, b in by_role.values()) / GiB,
            "by_role": {role: {"kernels": k, "gib": b / GiB} for role, (k, b) in sorted(by_role.items())},
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["resnet"])
    p.add_argument("--variants", nargs="+", default=["plain", "lossless", "int4", "int2"])
    p.add_argument("--batch", type=int)
    p.add_argument("--out", help="results JSON to add rows to (key 'traffic')")
    args = p.parse_args()
    results = open_results(args.out, "traffic", args.device, " ".join(["python", *sys.argv]))
    for model in args.models:
        base = None
        for variant in args.variants:
            rows = traffic(model, variant, args.device, args.batch)
            total = sum(r["gib"] for r in rows)
            base = total if variant == "plain" else base
            ratio = f"  ({total / base:.2f}x plain)" if base else ""
            print(f"{model} {variant}: {sum(r['kernels'] for r in rows)} kernels, {total * 1024:.1f} MiB moved{ratio}")
            for r in rows:
                parts = ", ".join(f"{role} {v['kernels']} / {v['gib'] * 1024:.1f} MiB" for role, v in r["by_role"].items())
                print(f"  {r['pass']:8s} {r['kernels']:4d} kernels {r['gib'] * 1024:8.1f} MiB   {parts}")
            for r in rows:
                put_result(args.out, results, "traffic", r, ("model", "variant", "batch", "graph"))


if __name__ == "__main__":
    main()
