"""Shared benchmark plumbing: models, one measured training run, results files.

Every number comes from ``measure()``: warm-up steps (the first compiles and
is timed as compile time), then timed steps with CUDA events (on the GPU) or
``perf_counter`` (CPU smoke runs), and the step's memory: ``steady`` is what
is allocated before a step (weights, optimizer state), ``activation`` is the
step's peak minus steady.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Callable

import torch
import torch.nn as nn

GiB = 1024**3


def build(name: str, device: str, batch: int | None):
    """(model, inputs, loss_fn) for a benchmark model name."""
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
        b = batch or 256
        x = torch.randn(b, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (b,), device=device)
        return model, (x,), lambda out: nn.functional.cross_entropy(out, y), b
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(attn_implementation="sdpa")
        cfg.use_cache = False
        model = GPT2LMHeadModel(cfg).to(device)
        b = batch or 8
        ids = torch.randint(0, cfg.vocab_size, (b, 1024), device=device)

        class LM(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids).logits

        def loss(logits):
            return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

        return LM(model), (ids,), loss, b * 1024
    from fxcompress.models import ZOO  # CPU smoke runs of the script itself

    torch.manual_seed(0)
    model = ZOO[name]().to(device)
    x = model.example_input(batch or 8).to(device)
    return model, (x,), lambda out: out.float().pow(2).mean(), x.shape[0]


@dataclasses.dataclass
class Measurement:
    model: str
    variant: str
    items_per_s: float
    step_ms: float
    compile_s: float
    steady_gib: float
    peak_gib: float
    activation_gib: float
    reserved_gib: float
    saved_gib_before: float | None = None
    saved_gib_after: float | None = None


def measure(model_name: str, variant: str, wrap: Callable, device: str, batch: int | None,
            steps: int, warmup: int, optimizer: str) -> tuple[Measurement, object]:
    model, inputs, loss_fn, items = build(model_name, device, batch)
    module = wrap(model)
    params = list(model.parameters())
    opt = make_optimizer(params, optimizer)
    cuda = device.startswith("cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(module(*inputs))
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
        steady = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
    else:
        steady = peak = reserved = 0
        t1 = time.perf_counter()
        for _ in range(steps):
            step()
        ms = (time.perf_counter() - t1) * 1000 / steps
    m = Measurement(
        model_name, variant, items / (ms / 1000), ms, compile_s,
        steady / GiB, peak / GiB, (peak - steady) / GiB, reserved / GiB,
    )
    return m, module


def make_optimizer(params, kind: str) -> torch.optim.Optimizer:
    """The benchmarks' optimizers: ``sgd`` (momentum 0.9) or ``adamw``."""
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(params, lr=1e-4)


def run_child(cmd: list[str], label: str) -> dict | None:
    """Run one measurement in a fresh process; its ``RESULT {json}`` line, or None (reported) on failure."""
    import subprocess
    import sys

    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        print(f"{label} FAILED:\n{out.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return env


def write_results(path: str, command: str, device: str, rows: list[Measurement]) -> None:
    payload = {"command": command, "environment": environment(device), "results": [dataclasses.asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
