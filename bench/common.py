"""Shared benchmark plumbing: the workloads, one measured training run, results files.

Every number comes from ``measure()``: warm-up steps (the first compiles and
is timed as compile time), then timed steps, each between two CUDA events on
the GPU (``perf_counter`` in CPU smoke runs), reported as the median step;
and the step's memory: ``steady`` is what is allocated before a step (weights,
optimizer state, the batch), ``activation`` is the step's peak minus steady.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch
import torch.nn as nn

GiB = 1024**3


@dataclasses.dataclass
class Workload:
    """One benchmark model with its batch and loss, and what the baselines need of it.

    ``blocks`` lists ``(parent, attribute)`` of each repeated block (the unit of
    per-block checkpointing); ``asa_layers`` maps the paper's ASA levels (1: FFN
    second linear, 2: both FFN linears, 3: + attention output, 4: + Q/K/V) to
    ``fnmatch`` patterns of module paths; ``ara_stride`` is the paper's stride.
    """

    model: nn.Module
    inputs: tuple
    loss_fn: Callable
    items: int  # images or tokens per step
    batch: int
    blocks: list[tuple[nn.Module, str]] = dataclasses.field(default_factory=list)
    asa_layers: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    ara_stride: int | tuple[int, ...] = 2
    hf: bool = False  # a transformers model: checkpointing through gradient_checkpointing_enable()


def compress_config(spec: str, ara_stride: int | tuple[int, ...] = 2,
                    asa_layers: dict[int, tuple[str, ...]] | None = None):
    """The ``CompressConfig`` a benchmark variant names: a codec (``int4``), or a learning rule
    with an optional codec for what it leaves: ``ara``, ``ara+int4``, ``asa`` (layers fed by an
    activation), ``asaN`` (the paper's level N, from ``asa_layers``), ``asa2+int8``; a codec with
    ``/det`` rounds to nearest (``int4/det``, ``stochastic_rounding=False``), as the report names it;
    with ``/triton`` its encoders are one Triton kernel each (``int4/triton``, ``encoders="triton"``).
    """
    import re

    import fxcompress

    rule, _, codec = spec.partition("+")
    if rule == "ara":
        return fxcompress.CompressConfig(codec=codec or "lossless", learning_rule="ara", ara_stride=ara_stride)
    level = re.fullmatch(r"asa(\d?)", rule)
    if level:
        if level[1] and int(level[1]) not in (asa_layers or {}):
            raise SystemExit(f"{spec!r}: this model has ASA levels {sorted(asa_layers or {})}, not {level[1]}")
        layers = asa_layers[int(level[1])] if level[1] else "after_activation"
        return fxcompress.CompressConfig(codec=codec or "lossless", learning_rule="asa", asa_layers=layers)
    if codec:
        raise SystemExit(f"{spec!r} is not accepted: only 'ara' and 'asa[N]' take '+CODEC'")
    rule, *flags = rule.split("/")
    if set(flags) - {"det", "triton"}:
        raise SystemExit(f"{spec!r} is not accepted: the suffixes are '/det' (round to nearest) "
                         f"and '/triton' (encoders='triton')")
    return fxcompress.CompressConfig(codec=rule, stochastic_rounding="det" not in flags,
                                     encoders="triton" if "triton" in flags else "aten")


def _children(seq: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(seq, name) for name, _ in seq.named_children()]


class LMLoss(nn.Module):
    """A language model with its next-token loss inside the compiled forward, as ``model(ids, labels=ids)``.

    NB: computed outside, the fp32 logits copy and log-softmax (1.5 GiB each at 8 x 1024)
    are eager allocations no captured graph sees; the first H100 run had exactly that gap.
    """

    def __init__(self, m: nn.Module, logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.m, self._logits = m, logits

    def forward(self, ids):
        logits = self._logits(self.m, ids)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _asa(ffn1: str, ffn2: str, attn_out: str | None, qkv: tuple[str, ...]) -> dict[int, tuple[str, ...]]:
    levels = {1: (ffn2,), 2: (ffn1, ffn2)}
    if attn_out:  # torchvision's ViT runs attention through nn.MultiheadAttention's functional path
        levels[3] = (ffn1, ffn2, attn_out)
        levels[4] = (ffn1, ffn2, attn_out, *qkv)
    return levels


def build(name: str, device: str, batch: int | None) -> Workload:
    """The workload of a benchmark model name, on ``device``; ``batch`` overrides the default."""
    if name == "resnet50":
        import torchvision.models

        model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
        b = batch or 256
        x = torch.randn(b, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (b,), device=device)
        blocks = [blk for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in _children(stage)]
        return Workload(model, (x,), lambda out: nn.functional.cross_entropy(out, y), b, b, blocks,
                        ara_stride=(3, 4, 2, 2))
    if name == "vit_b_16":
        import torchvision.models

        model = torchvision.models.vit_b_16().to(device)
        b = batch or 128
        x = torch.randn(b, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (b,), device=device)
        return Workload(model, (x,), lambda out: nn.functional.cross_entropy(out, y), b, b,
                        _children(model.encoder.layers), _asa("*.mlp.0", "*.mlp.3", None, ()))
    if name in ("gpt2", "bert"):
        if name == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(attn_implementation="sdpa", use_cache=False)
            hf, b, seq = GPT2LMHeadModel(cfg).to(device), batch or 16, 1024
            blocks = _children(hf.transformer.h)
            asa = _asa("*.mlp.c_fc", "*.mlp.c_proj", "*.attn.c_proj", ("*.attn.c_attn",))
        else:
            from transformers import BertConfig, BertForMaskedLM

            cfg = BertConfig(attn_implementation="sdpa")
            hf, b, seq = BertForMaskedLM(cfg).to(device), batch or 32, 512
            blocks = _children(hf.bert.encoder.layer)
            # NB: "layer.N.output.dense" is the FFN's second linear, "layer.N.attention.output.dense" is not
            ffn2 = "*.layer.[0-9].output.dense", "*.layer.[0-9][0-9].output.dense"
            asa = {1: ffn2, 2: ("*.intermediate.dense", *ffn2)}
            asa[3] = (*asa[2], "*.attention.output.dense")
            asa[4] = (*asa[3], "*.attention.self.query", "*.attention.self.key", "*.attention.self.value")
        ids = torch.randint(0, cfg.vocab_size, (b, seq), device=device)
        model = LMLoss(hf, lambda m, i: m(input_ids=i).logits)
        return Workload(model, (ids,), lambda loss: loss, b * seq, b, blocks, asa, hf=True)
    from fxcompress.models import ZOO, TinyTransformer  # CPU smoke runs of the scripts themselves

    torch.manual_seed(0)
    model = ZOO[name]().to(device)
    x = model.example_input(batch or 8).to(device)
    blocks = [blk for attr in ("stage1", "stage2", "blocks") if hasattr(model, attr) for blk in _children(getattr(model, attr))]
    asa = _asa("*.fc", "*.out", "*.proj", ("*.qkv",)) if isinstance(model, TinyTransformer) else {}
    return Workload(model, (x,), lambda out: out.float().pow(2).mean(), x.shape[0], x.shape[0], blocks, asa)


@dataclasses.dataclass
class Measurement:
    model: str
    variant: str
    batch: int
    items_per_s: float
    step_ms: float  # median of the timed steps
    compile_s: float  # the first step (it compiles) minus a median step
    steady_gib: float
    peak_gib: float
    activation_gib: float
    reserved_gib: float
    saved_gib_before: float | None = None
    saved_gib_after: float | None = None
    blocks_saved_gib_before: float | None = None  # the part saved inside the repeated blocks
    blocks_saved_gib_after: float | None = None
    notes: str = ""

    @classmethod
    def of(cls, row: dict) -> "Measurement":
        """A results row as a Measurement; the row's other keys (``commit``, ...) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


def measure(model_name: str, variant: str, wrap: Callable[[Workload], nn.Module], device: str,
            batch: int | None, steps: int, warmup: int, optimizer: str) -> tuple[Measurement, nn.Module]:
    work = build(model_name, device, batch)
    module = wrap(work)
    opt = make_optimizer(list(work.model.parameters()), optimizer)
    cuda = device.startswith("cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = work.loss_fn(module(*work.inputs))
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync()
    steady = peak = reserved = 0
    if cuda:
        steady = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t1) * 1000)
    ms = statistics.median(times)
    m = Measurement(
        model_name, variant, work.batch, work.items / (ms / 1000), ms, first_s - ms / 1000,
        steady / GiB, peak / GiB, (peak - steady) / GiB, reserved / GiB,
    )
    return m, module


def make_optimizer(params, kind: str) -> torch.optim.Optimizer:
    """The benchmarks' optimizers: ``sgd`` (momentum 0.9) or ``adamw``."""
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(params, lr=1e-4)


def run_child(cmd: list[str], label: str, timeout: float | None = None) -> dict | None:
    """Run one measurement in a fresh process; its ``RESULT {json}`` line, or None (reported) on failure.

    The process starts with empty compile caches (Inductor's and Triton's, in a temporary
    directory removed after it): every variant compiles cold, as a user's first run does, and
    none is served kernels that another variant compiled (until 2026-12-01 they were shared).
    """
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fxcompress-bench-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"{label} TIMED OUT after {timeout:.0f} s", file=sys.stderr)
            return None
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        print(f"{label} FAILED:\n{out.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "date": datetime.date.today().isoformat()}
    if commit := _commit():
        env["commit"] = commit
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return env


def _commit() -> str | None:
    """The fxcompress commit measured: ``$FXCOMPRESS_COMMIT`` (a device machine's copy of the working
    tree may lack ``.git``; bench/gpu_session.sh passes it), else ``git rev-parse`` with ``+dirty``
    appended when the package or the bench scripts differ from it, else None."""
    if commit := os.environ.get("FXCOMPRESS_COMMIT"):
        return commit
    here = os.path.dirname(os.path.abspath(__file__))
    head = _git("rev-parse", "--short", "HEAD", cwd=here)
    if not head:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", "fxcompress", "bench",
                   ":(exclude)bench/results", cwd=os.path.dirname(here))
    return head + "+dirty" if changed else head


def _git(*args: str, cwd: str) -> str | None:
    """``git args`` run in ``cwd``: its stripped output, or None when git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def block_paths(work: Workload) -> tuple[str, ...]:
    """The module paths of ``work``'s repeated blocks."""
    paths = {id(m): p for p, m in work.model.named_modules()}
    return tuple(paths[id(getattr(parent, name))] for parent, name in work.blocks)


def in_blocks(row, blocks: tuple[str, ...]) -> bool:
    """Whether a report row's tensor was made inside one of ``blocks`` (paths from :func:`block_paths`)."""
    return any(row.module == b or row.module.startswith(b + ".") for b in blocks)


def open_results(path: str | None, key: str, device: str, command: str | None) -> dict:
    """A results file that runs accumulate into: its ``commands`` (``command`` appended unless
    already there: a rerun replaces its rows), this run's ``environment``, and the rows under
    ``key`` (empty for a new file)."""
    data = {"commands": [], key: []}
    if path and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if command and command not in data["commands"]:
        data["commands"].append(command)
    data["environment"] = environment(device)
    return data


def put_result(path: str | None, data: dict, key: str, row: dict, same: tuple[str, ...]) -> None:
    """Replace the row of ``data[key]`` equal to ``row`` in the fields ``same`` (or add it), then write
    the file, after every row, so that a run cut short keeps what it finished."""
    if "commit" in data.get("environment", {}):  # NB: rows accumulate over runs; each names its own
        row = {**row, "commit": data["environment"]["commit"]}
    data[key] = [r for r in data[key] if any(r[f] != row[f] for f in same)] + [row]
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
