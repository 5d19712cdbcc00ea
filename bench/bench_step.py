"""One training step under every tool a user would pick: throughput, peak and activation memory, compile time.

    # issue 6, one part per device call (each well inside 10 minutes); rows accumulate in --out
    python bench/bench_step.py --models resnet50 --variants baselines --out bench/results/step_h100.json
    python bench/bench_step.py --models resnet50 --variants fxcompress --out bench/results/step_h100.json
    python bench/bench_step.py --models gpt2 --variants torch.compile "fxcompress int8" "fxcompress asa2" \\
        --out bench/results/step_h100.json
    # CPU smoke run of the script itself on the built-in models
    python bench/bench_step.py --device cpu --models resnet transformer --variants torch.compile "fxcompress int4"

Models (random init, bf16 autocast on CUDA): ``resnet50`` (torchvision, batch
256, channels-last, SGD), ``vit_b_16`` (torchvision, batch 128, SGD),
``gpt2`` (transformers GPT-2 small, 16 x 1024 tokens, AdamW), ``bert``
(transformers BERT-base, 32 x 512 tokens, AdamW); the language models' loss is
computed inside the compiled module.

Variants:

- ``eager``: the model as it is.
- ``torch.compile``: Inductor.
- ``checkpoint``: eager with every block under ``torch.utils.checkpoint``
  (non-reentrant; transformers models through ``gradient_checkpointing_enable``).
- ``budget 0.5``: ``torch.compile`` with ``activation_memory_budget = 0.5``.
- ``inductor fp8``: ``torch.compile`` with Inductor's activation-quantization
  pass (``post_grad_fusion_options["activation_quantization_aten_pass"]``,
  float8_e5m2 with scaling, tensors of 100 MB and more).
- ``fxcompress SPEC``: ``fxcompress.compile`` on the Inductor backend, SPEC a codec or ``ara``,
  ``ara+int4``, ``asaN``, ``asaN+int8`` (the paper's ASA levels).
- ``baselines`` and ``fxcompress`` expand to each model's default set.

Each variant runs in its own process, so memory and caches start clean; a
variant that fails or passes ``--timeout`` is reported and skipped. Memory
is the step's peak minus what is allocated before it (weights, optimizer
state, the batch); gradients are set to None before each step, so they are
part of the step. Step time is the median of ``--steps`` steps, each timed
with CUDA events after ``--warmup`` steps; compile time is the first step
minus a median step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fxcompress  # noqa: E402
from common import (  # noqa: E402
    GiB, Measurement, Workload, block_paths, compress_config, in_blocks, measure, open_results, put_result,
    run_child,
)

BASELINES = ("eager", "torch.compile", "checkpoint", "budget 0.5", "inductor fp8")
QUANT = ("lossless", "int8", "int4", "int2", "fp8")
FXCOMPRESS = {
    "resnet50": (*QUANT, "blpa4", "ara", "ara+int4"),
    "vit_b_16": (*QUANT, "asa2"),
    "gpt2": (*QUANT, "asa2", "asa4", "asa2+int8"),
    "bert": (*QUANT, "asa2", "asa4", "asa2+int8"),
    "resnet": (*QUANT, "blpa4", "ara", "ara+int4"),  # CPU smoke runs
    "transformer": (*QUANT, "asa2", "asa2+int8"),
}
OPTIMIZER = {"resnet50": "sgd", "vit_b_16": "sgd"}  # others: adamw
FP8_PASS = {"quant_type": "torch.float8_e5m2", "size_in_mb": 100, "use_scaling": True}


class _Checkpointed(nn.Module):
    """``block`` run under non-reentrant activation checkpointing."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def _checkpoint_blocks(work: Workload) -> nn.Module:
    if work.hf:
        work.model.m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        if not work.blocks:
            raise SystemExit("checkpoint: this model has no blocks listed in bench/common.py")
        for parent, name in work.blocks:
            setattr(parent, name, _Checkpointed(getattr(parent, name)))
    return work.model


def expand(model: str, variants: list[str]) -> list[str]:
    out = []
    for v in variants:
        if v == "baselines":
            out += BASELINES
        elif v == "fxcompress":
            out += [f"fxcompress {spec}" for spec in FXCOMPRESS.get(model, QUANT)]
        else:
            out.append(v)
    return list(dict.fromkeys(out))


def wrap_for(variant: str, backend: str | None = None):
    """``Workload -> module`` for a variant name; SystemExit naming the accepted forms otherwise."""
    if variant == "eager":
        return lambda work: work.model
    if variant == "torch.compile":
        return lambda work: torch.compile(work.model)
    if variant == "checkpoint":
        return _checkpoint_blocks
    if variant.startswith("budget "):
        budget = float(variant.split()[1])

        def with_budget(work):
            torch._functorch.config.activation_memory_budget = budget  # this process runs one variant
            return torch.compile(work.model)

        return with_budget
    if variant == "inductor fp8":
        def with_fp8_pass(work):
            torch._inductor.config.post_grad_fusion_options = {"activation_quantization_aten_pass": FP8_PASS}
            return torch.compile(work.model)

        return with_fp8_pass
    if variant.startswith("fxcompress "):
        spec = variant.split(maxsplit=1)[1]

        def with_fxcompress(work):
            config = compress_config(spec, work.ara_stride, work.asa_layers)
            return fxcompress.compile(work.model, config, backend=backend or "inductor")

        return with_fxcompress
    raise SystemExit(
        f"variant {variant!r} is not accepted; use one of {', '.join(BASELINES)}, 'budget X', "
        f"'fxcompress SPEC' (SPEC: a codec, ara, ara+CODEC, asaN, asaN+CODEC), 'baselines' or 'fxcompress'"
    )


def run_one(args) -> None:
    blocks: tuple[str, ...] = ()

    def wrap(work):
        nonlocal blocks
        blocks = block_paths(work)
        return wrap_for(args.one_variant, args.backend)(work)

    m, module = measure(args.one_model, args.one_variant, wrap, args.device, args.batch, args.steps,
                        args.warmup, OPTIMIZER.get(args.one_model, "adamw"))
    if isinstance(module, fxcompress.CompressedModule):
        report = fxcompress.explain(module)
        m.saved_gib_before, m.saved_gib_after = report.saved_bytes_before / GiB, report.saved_bytes_after / GiB
        rows = [r for r in report.rows if r.counted and in_blocks(r, blocks)]
        m.blocks_saved_gib_before = sum(r.bytes_before for r in rows) / GiB
        m.blocks_saved_gib_after = sum(r.bytes_after for r in rows) / GiB
    print("RESULT " + json.dumps(dataclasses.asdict(m)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    p.add_argument("--variants", nargs="+", default=["baselines", "fxcompress"])
    p.add_argument("--backend", choices=["inductor", "eager"], help="force fxcompress's backend")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=540, help="seconds per variant")
    p.add_argument("--out", help="results file; rows of the same model, variant and batch are replaced")
    p.add_argument("--one-model", help=argparse.SUPPRESS)
    p.add_argument("--one-variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_model:
        return run_one(args)

    plan = [(model, v) for model in args.models for v in expand(model, args.variants)]
    for _, v in plan:
        wrap_for(v)  # a bad name stops here, before any run
    command = " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    data = open_results(args.out, "results", args.device, command)
    for i, (model, variant) in enumerate(plan, 1):
        print(f"[bench {i}/{len(plan)}] {model} / {variant} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--one-model", model, "--one-variant", variant]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--backend", args.backend] if args.backend else []
        result = run_child(cmd, f"[bench] {model} / {variant}", args.timeout)
        if result is None:
            continue
        put_result(args.out, data, "results", result, same=("model", "variant", "batch"))
        new = Measurement.of(result)
        print(f"[bench] {model} / {variant}: {new.items_per_s:,.0f}/s, activation {new.activation_gib:.2f} GiB, "
              f"compile {new.compile_s:.0f} s", file=sys.stderr, flush=True)

    print(f"\n{'model':<12} {'variant':<26} {'items/s':>10} {'x tc':>6} {'act GiB':>8} {'saved GiB':>14} {'compile s':>9}")
    rows = [Measurement.of(r) for r in data["results"]]
    base = {r.model: r for r in rows if r.variant == "torch.compile"}
    for r in rows:
        rel = r.items_per_s / base[r.model].items_per_s if r.model in base else float("nan")
        saved = f"{r.saved_gib_before:.2f}->{r.saved_gib_after:.2f}" if r.saved_gib_before is not None else "-"
        print(f"{r.model:<12} {r.variant:<26} {r.items_per_s:>10,.0f} {rel:>6.2f} {r.activation_gib:>8.2f} "
              f"{saved:>14} {r.compile_s:>9.1f}")


if __name__ == "__main__":
    main()
