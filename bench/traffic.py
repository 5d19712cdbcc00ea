"""What Inductor generates for a compressed step: kernels and bytes moved, by role.

    python bench/traffic.py --models resnet --batch 32 --variants plain int4 int2       # CPU
    python bench/traffic.py --device cuda --models resnet50 --variants plain int4 int2  # GPU
    python bench/traffic.py --codegen triton --models resnet --variants plain int4         # Triton's fusion, no GPU

``--codegen triton`` (needs ``pip install triton``; no GPU) has Inductor
generate Triton kernels for the CPU device (``cpu_backend="triton"``) and
never compile or run them: the forward's first kernel launch stops the step,
after both graphs were lowered (``force_non_lazy_backward_lowering``). It
shows Triton's scheduler at work (which ops fuse into one kernel, the same
``can_fuse`` rules as on CUDA) with bf16 autocast as on a GPU; CUDA's device
properties, autotuning and some heuristics (persistent reductions) differ, so
it answers "how many kernels, which fused", not "how fast".

One training step per variant, compiled with Inductor (its FX graph cache off,
so every graph is generated). After Inductor's fusion, each kernel (a scheduler
node: a fused group of ops, or an extern call such as a convolution) is
classed by the fxcompress roles of the FX nodes it was made from: ``model``
(untagged), ``encode``, ``decode``, ``predicate`` (a comparison the backward
made of recomputed values, computed in the forward:
``fxcompress/passes/predicates.py``), or a fused mix such as ``model+encode``
(an encoder fused into the kernel that produces its input). Bytes are
Inductor's own count of each kernel's buffer reads and writes
(``get_read_write_buffers_sizes``, what its ``inductor_metrics`` log sums), so
``model+encode`` bytes include the producer's own traffic. ``plain`` is
``torch.compile`` of the same model. The bytes are an accounting, not a
timing: ``bench/bench_step.py`` times the step.

Each variant's first row has ``first_step_s``, the wall time of its first step: capture, the
rewrite and Inductor's lowering and code generation (with ``--codegen triton``, nothing else:
Triton never compiles; on a device, the kernels' compilation and one run too).

``--time N`` (``--codegen run``) adds where the time goes: after the compiling
step and one warm-up, N steps run under ``torch.profiler``, forward and
backward in separate windows (Inductor numbers its kernels per graph), and
each kernel's device time (CUDA; on the CPU, Inductor's C++ kernels through
``cpp.enable_kernel_profile``) is summed under the role of the scheduler nodes
its generated code was made from (:func:`kernel_role`). Kernels Inductor did
not generate (cuDNN's and cuBLAS's, the convolutions and matrix products) are
``extern``, always model code. Milliseconds are per step; the profiler's own
overhead is in them, the same for every variant.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from common import GiB, build, compress_config, open_results, put_result  # noqa: E402
from fxcompress.ir import META_KEY  # noqa: E402

PIN = torch.ops.prims.inductor_force_stride_order.default  # fxcompress's layout pin (passes/rewrite.py)
ENCODE_OP = torch.ops.fxcompress.affine_encode.default  # encoders="triton": one extern call per encoder ...
ENCODE_KERNEL = "affine_encode_kernel"  # ... that runs this Triton kernel (fxcompress/codecs/_triton_encode.py)


def graph_roles(graph) -> dict:
    """Each FX node's fxcompress role: its tag's, or for an untagged node that only codec code of
    one role reads, that role (Inductor's pass that replaces ``rand`` with its own seeded random
    ops drops the tags); anything else is ``model``, the layout pin included (it only fixes the
    layout of a model tensor that plain ``torch.compile`` writes out too, as a saved output).
    Users come after producers, so one reverse pass."""
    roles = {}
    for node in reversed(graph.nodes):
        tag = node.meta.get(META_KEY)
        users = {roles[u] for u in node.users}
        if node.target is PIN:  # the layout of the model's own tensor, written as plain torch.compile writes it
            roles[node] = "model"
        else:
            role = tag.get("role") if tag else None  # NB: a saved mask of the model's own has a tag, no role
            roles[node] = role or (users.pop() if len(users) == 1 and "model" not in users else "model")
    return roles


def kernel_role(snode, memo: dict) -> str:
    """``model``, ``encode``, ``decode``, ``alias``, ``derived``, ``predicate`` or a ``+``-joined mix, from the
    origins' roles.
    ``memo`` holds :func:`graph_roles` per FX graph."""
    roles = set()
    for part in snode.get_nodes():
        for origin in (part.node.get_origins() if part.node is not None else ()):
            if origin.graph not in memo:
                memo[origin.graph] = graph_roles(origin.graph)
            roles.add(memo[origin.graph][origin])
    return _join(roles)


class _NotRun(Exception):
    """A kernel of a codegen-only step was launched: lowering is over."""


class _Empty:
    """A Triton kernel that is launched as a no-op (:func:`triton_codegen_only`'s ``run_empty``)."""

    launches = 0  # NB: counted, so that a run can show its kernels were Triton's

    def run(self, *args, **kwargs):
        _Empty.launches += 1

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# NB: an H100's, so that the autotuner picks the configs (block sizes, warps) it picks on one
H100 = ("DeviceProperties(type='cuda', index=0, multi_processor_count=132, cc=90, major=9, "
        "regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, max_threads_per_block=1024, "
        "warp_size=32)")


class TritonBuild:
    """Compiles each kernel the proxy generates for an H100 (sm_90), as a GPU's first step does.

    Triton's compiler and the ``ptxas`` its wheel carries run on the CPU: each kernel's
    source, its device properties made an H100's, is loaded, and every config its autotuner
    would benchmark is compiled to a cubin, one after the other (a GPU machine compiles them
    in parallel worker processes, one per core). ``seconds`` sums those compiles, the CPU time
    a device's workers share; ``kernels`` and ``binaries`` count them, ``cubin_bytes`` sums the
    machine code.
    """

    def __init__(self) -> None:
        self.seconds, self.kernels, self.binaries, self.cubin_bytes = 0.0, 0, 0, 0
        self._dir = tempfile.mkdtemp(prefix="fxcompress-triton-build-")

    def __call__(self, name: str, source: str) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        started = time.perf_counter()
        source = re.sub(r"DeviceProperties\(type='cpu'[^)]*\)", H100, source)
        path = os.path.join(self._dir, f"{name}_{self.kernels}.py")
        with open(path, "w") as f:
            f.write(source.replace("triton_helpers.set_driver_to_cpu()", ""))
        spec = importlib.util.spec_from_file_location(f"_fxcompress_kernel_{self.kernels}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tuner = getattr(module, name)
        meta, fn = tuner.triton_meta, tuner.fn
        signature = dict(meta["signature"])
        attrs = meta["configs"][0] if meta.get("configs") else {}
        for config in tuner.configs:
            values = {**meta.get("constants", {}), **config.kwargs}
            constexprs = {(fn.arg_names.index(k),): v for k, v in values.items() if k in fn.arg_names}
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages,
                       "enable_fp_fusion": meta.get("enable_fp_fusion", True)}
            compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
            self.binaries += 1
            self.cubin_bytes += len(compiled.asm["cubin"])
        self.kernels += 1
        self.seconds += time.perf_counter() - started


@contextlib.contextmanager
def triton_codegen_only(run_empty: bool = False, build: TritonBuild | None = None):
    """Inductor lowers to Triton for the CPU device and records, never compiles, its kernels.

    ``run_empty``: the step runs on, each Triton kernel launched as a no-op and every buffer
    the generated code allocates zeroed (so that indices read from one stay in range): the
    allocations, the frees and the extern kernels (convolutions, matrix products) are real,
    the values are not. ``bench/peak.py --codegen triton`` measures the memory of the code
    Triton's scheduler makes that way: which buffers live when, as on a GPU.
    ``build``: each kernel is also compiled for an H100 as it is generated (:class:`TritonBuild`).
    """
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("--codegen triton needs Triton's compiler package: pip install triton")
    import torch._C._dynamo.guards as guards
    import torch._functorch.config as functorch_config
    import torch._inductor.async_compile as async_compile
    import torch.utils._triton as torch_triton

    class Unrunnable:
        def __getattr__(self, name):
            raise _NotRun(name)

    def zeroed(size, stride, dtype):
        return torch.empty_strided(size, stride, dtype=dtype).zero_()

    def kernel(self, name, source, *args, **kwargs):
        if build is not None:
            build(name, source)
        return _Empty() if run_empty else Unrunnable()

    patches = [(async_compile.AsyncCompile, "triton", kernel),
               # NB: asks Triton's active driver, and a machine without a GPU has none
               (torch_triton, "triton_hash_with_backend", lambda: "codegen-only")]
    if run_empty:  # NB: the generated module binds it when it is loaded, after this patch
        patches.append((guards, "_empty_strided_cpu", zeroed))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        # NB: since torch 2.12 a CPU buffer is inlined into its readers up to 50 ops and 12
        # reads (GPU: 30 and 8), whatever the code generator; the GPU's limits are set here
        # (torch 2.11 has them for every device), so that what is written out is what CUDA writes.
        with torch._inductor.config.patch(cpu_backend="triton", realize_opcount_threshold=30,
                                          realize_acc_reads_threshold=8), \
                functorch_config.patch(force_non_lazy_backward_lowering=True):
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def step_autocast(device: str, codegen: str) -> torch.autocast:
    """bf16 autocast where a GPU step runs it: on a GPU, and for ``--codegen triton`` (Triton's fusion as
    a GPU sees it); off for the CPU's own code (C++). Also ``compile_time.py``'s."""
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                          enabled=device.startswith("cuda") or codegen.startswith("triton"))


@contextlib.contextmanager
def kernel_names(names: dict):
    """While open, ``names[scheduler node name]`` = the name of the kernel Inductor generates
    for it (Triton or C++); a kernel can serve several nodes (C++ fuses loops, and equal
    source is defined once). Nodes without one are extern calls or aliases."""
    from torch._inductor.codegen.cpp import CppScheduling
    from torch._inductor.codegen.triton import TritonScheduling

    saved = [(cls, cls.define_kernel) for cls in (TritonScheduling, CppScheduling)]

    def wrap(define):
        def define_kernel(self, src_code, nodes, *args, **kwargs):
            name = define(self, src_code, nodes, *args, **kwargs)
            for node in nodes:  # NB: Triton's schedules hold markers too
                for part in node.get_nodes() if hasattr(node, "get_nodes") else ():
                    names[part.get_name()] = name
            return name
        return define_kernel

    for cls, define in saved:
        cls.define_kernel = wrap(define)
    try:
        yield
    finally:
        for cls, define in saved:
            cls.define_kernel = define


def _profile(fn, device: str) -> collections.Counter:
    """``fn()`` under ``torch.profiler``: device milliseconds per kernel name."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    # NB: CUDA alone on a GPU, as bench/where_peak.py, whose H100 log lists each kernel with its time
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    times = collections.Counter()
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0:  # NB: a C++ kernel's range is its name after "graph_<id>_"
            times[e.key if cuda else re.sub(r"^graph_\d+_", "", e.key)] += t / 1000
    return times


def _timing(times: collections.Counter, kernels: dict, cuda: bool, steps: int, top: int = 12) -> dict:
    """Per step: milliseconds and achieved GB/s by role, and the ``top`` slowest kernels.
    ``kernels``: generated kernel name -> [roles, bytes per step]. A kernel named like Inductor's
    but not among them is ``unmatched`` (the attribution failed: never expected); on CUDA every
    other kernel is ``extern`` (no byte count); on the CPU other ranges are not kernels: dropped."""
    by_role = collections.defaultdict(lambda: [0.0, 0])
    slow = []
    for key, ms in times.items():
        ms /= steps
        if key in kernels:
            roles, nbytes = kernels[key]
            role = _join(roles)
            slow.append({"kernel": key, "role": role, "ms": ms, "mib": nbytes / 2**20, "gb_s": nbytes / ms / 1e6})
        elif key.startswith(("triton_", "cpp_", ENCODE_KERNEL)):
            role, nbytes = "unmatched", 0
        elif cuda:
            role, nbytes = "extern", 0
        else:
            continue
        by_role[role][0] += ms
        by_role[role][1] += nbytes
    slow.sort(key=lambda k: -k["ms"])
    return {
        "ms": {role: ms for role, (ms, _) in sorted(by_role.items())},
        "gb_s": {role: b / ms / 1e6 for role, (ms, b) in sorted(by_role.items()) if b},
        "slowest": slow[:top],
    }


_ROLES = ["model", "encode", "decode", "alias", "derived", "predicate"]


def _join(roles) -> str:
    parts = {p for r in roles for p in r.split("+")}
    return "+".join(sorted(parts, key=_ROLES.index)) or "model"


def traffic(model_name: str, variant: str, device: str, batch: int | None, codegen: str = "run",
            time_steps: int = 0) -> list[dict]:
    """One step of ``variant`` (``plain`` or an fxcompress spec); a row per compiled graph.
    ``codegen="triton"``: lowered to Triton on the CPU, never run (:func:`triton_codegen_only`).
    ``time_steps``: then that many profiled steps, device milliseconds by role per pass."""
    from torch._inductor import ir
    from torch._inductor.graph import GraphLowering

    torch._dynamo.reset()
    torch._inductor.config.fx_graph_cache = False
    graphs = []
    original = GraphLowering.codegen

    def spy(self):
        names = {}
        with kernel_names(names):
            out = original(self)
        by_role, memo = collections.defaultdict(lambda: [0, 0]), {}
        kernels = collections.defaultdict(lambda: [set(), 0])  # generated kernel -> roles, bytes
        for snode in self.scheduler.nodes:
            role, nbytes = kernel_role(snode, memo), snode.get_read_write_buffers_sizes()
            # NB: an output of a multi-output extern call (convolution backward's, the encode op's) is
            # a scheduler node of its own but no kernel: its bytes count, not it (until 2026-12-01 it did)
            by_role[role][0] += not isinstance(snode.node, ir.MultiOutput)
            by_role[role][1] += nbytes
            name = next((names[p.get_name()] for p in snode.get_nodes() if p.get_name() in names), None)
            if getattr(snode.node, "op_overload", None) is ENCODE_OP:  # an extern call: the kernel has its own name
                name = ENCODE_KERNEL
            if name is not None:
                kernels[name][0].add(role)
                kernels[name][1] += nbytes
        graphs.append((self.is_backward, dict(by_role), dict(kernels)))
        return out

    work = build(model_name, device, batch)
    if variant == "plain":
        module = torch.compile(work.model)
    else:
        module = fxcompress.compile(work.model, compress_config(variant, work.ara_stride, work.asa_layers),
                                    backend="inductor")
    GraphLowering.codegen = spy
    cuda = device.startswith("cuda")
    autocast = step_autocast(device, codegen)
    started = time.perf_counter()
    try:
        # NB: C++ kernels appear in the profiler only when compiled with their own ranges
        with triton_codegen_only() if codegen == "triton" else contextlib.nullcontext(), \
                torch._inductor.config.patch({"cpp.enable_kernel_profile": bool(time_steps)}), autocast:
            loss = work.loss_fn(module(*work.inputs))
            loss.backward()
    except _NotRun:
        pass
    finally:
        GraphLowering.codegen = original
    first_step_s = time.perf_counter() - started  # compiling; with --codegen triton all of it is
    timed = {}
    if time_steps:
        state = {}

        def forward():
            with autocast:
                state["loss"] = work.loss_fn(module(*work.inputs))

        def backward():
            state.pop("loss").backward()

        forward(), backward()  # warm-up: autotuning and caches settle
        fw, bw = collections.Counter(), collections.Counter()
        for _ in range(time_steps):
            work.model.zero_grad(set_to_none=True)
            fw += _profile(forward, device)
            bw += _profile(backward, device)
        for is_backward, times in ((False, fw), (True, bw)):
            kernels = {k: v for b, _, ks in graphs if b == is_backward for k, v in ks.items()}
            timed[is_backward] = _timing(times, kernels, cuda, time_steps)
    rows = []
    for i, (backward, by_role, _) in enumerate(graphs):
        rows.append({
            "model": model_name, "variant": variant, "batch": work.batch, "graph": i, "codegen": codegen,
            "pass": "backward" if backward else "forward",
            "kernels": sum(k for k, _ in by_role.values()),
            "gib": sum(b for _, b in by_role.values()) / GiB,
            "by_role": {role: {"kernels": k, "gib": b / GiB} for role, (k, b) in sorted(by_role.items())},
        })
    if rows:  # NB: nothing compiled, nothing to say
        rows[0]["first_step_s"] = first_step_s
    for backward, timing in timed.items():  # NB: per pass, on the pass's first graph's row
        next(r for r in rows if (r["pass"] == "backward") == backward).update(timing)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["resnet"])
    p.add_argument("--variants", nargs="+", default=["plain", "lossless", "int4", "int2"])
    p.add_argument("--batch", type=int)
    p.add_argument("--codegen", choices=["run", "triton"], default="run",
                   help="run: compile and run one step; triton: Triton kernels for the CPU, generated, not run")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="then profile N steps: device milliseconds per step by role (--codegen run)")
    p.add_argument("--out", help="results JSON to add rows to (key 'traffic')")
    args = p.parse_args()
    if args.codegen == "triton" and args.device != "cpu":
        p.error("--codegen triton generates for the CPU device: leave --device at cpu")
    if args.codegen == "triton" and args.time:
        p.error("--time needs kernels that run: --codegen run")
    results = open_results(args.out, "traffic", args.device, " ".join(["python", *sys.argv]))
    for model in args.models:
        base = None
        for variant in args.variants:
            rows = traffic(model, variant, args.device, args.batch, args.codegen, args.time)
            total = sum(r["gib"] for r in rows)
            base = total if variant == "plain" else base
            ratio = f"  ({total / base:.2f}x plain)" if base else ""
            print(f"{model} {variant}: {sum(r['kernels'] for r in rows)} kernels, {total * 1024:.1f} MiB moved{ratio}")
            for r in rows:
                parts = ", ".join(f"{role} {v['kernels']} / {v['gib'] * 1024:.1f} MiB" for role, v in r["by_role"].items())
                print(f"  {r['pass']:8s} {r['kernels']:4d} kernels {r['gib'] * 1024:8.1f} MiB   {parts}")
                if "ms" in r:
                    parts = ", ".join(f"{role} {ms:.2f}" + (f" ({r['gb_s'][role]:.0f} GB/s)" if role in r["gb_s"] else "")
                                      for role, ms in r["ms"].items())
                    print(f"  {r['pass']:8s} {sum(r['ms'].values()):8.2f} ms per step   {parts}")
                    for k in r["slowest"]:
                        print(f"    {k['ms']:8.3f} ms {k['mib']:9.1f} MiB {k['gb_s']:7.0f} GB/s  {k['role']:14s} {k['kernel']}")
            for r in rows:
                put_result(args.out, results, "traffic", r, ("model", "variant", "batch", "graph"))


if __name__ == "__main__":
    main()
