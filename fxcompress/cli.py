"""Command line: ``fxcompress demo``, ``fxcompress explain`` and ``fxcompress visualize``.

Examples::

    fxcompress demo                                   # built-in models, every implemented codec
    fxcompress demo --backend inductor --steps 5
    fxcompress explain fxcompress.models:ConvNet --input 8x3x16x16 --codec lossless
    fxcompress explain fxcompress.models:TinyTransformer --input int:4x32:96
    fxcompress explain torchvision.models:resnet50 --input 8x3x224x224 --codec int4 --autocast bf16
    fxcompress explain torchvision.models:resnet50 --input 8x3x224x224 --codec blpa4 --set blpa_fallback=int4
    fxcompress visualize fxcompress.models:ResidualCNN --input 8x3x32x32 --codec int4 -o step.svg

Input shapes: ``AxBxC`` is a float tensor of that shape (standard normal);
``int:AxB:N`` is an int64 tensor of token ids drawn from ``[0, N)``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import api
from .config import IMPLEMENTED_CODECS, Backend, Codec, CompressConfig
from .errors import FxCompressError
from .visualize.report import format_bytes

__all__ = ["main", "parse_input", "parse_settings", "load_factory"]


class CliError(FxCompressError):
    """A command-line argument that is not accepted."""


def parse_input(spec: str) -> torch.Tensor:
    """``8x3x32x32`` -> a random float tensor; ``int:4x128:50257`` -> random ids in ``[0, 50257)``."""
    form = "accepted forms: '8x3x32x32' (float) or 'int:4x128:50257' (token ids below 50257)"
    kind, _, rest = spec.partition(":") if spec.startswith("int:") else ("float", "", spec)
    shape_text, high = (rest.split(":") + [""])[:2] if kind == "int" else (rest, "")
    try:
        shape = [int(d) for d in shape_text.lower().split("x")]
        if not shape or any(d <= 0 for d in shape):
            raise ValueError
        if kind == "int":
            n = int(high)
            if n <= 0:
                raise ValueError
            return torch.randint(0, n, shape)
        return torch.randn(shape)
    except ValueError:
        raise CliError(f"--input {spec!r} is malformed; {form}") from None


def parse_settings(pairs: Sequence[str]) -> dict:
    """``["group_size=64", "ara_stride=3,4,2,2"]`` -> CompressConfig keyword arguments.

    A value is read as a Python literal where it is one (``64``, ``False``, ``3,4,2,2``
    as a tuple, ``0.02``), as text otherwise (``int4``); CompressConfig checks it.
    """
    fields = [f.name for f in dataclasses.fields(CompressConfig) if f.name != "codec"]
    out = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise CliError(f"--set {pair!r} is malformed; use FIELD=VALUE, e.g. --set group_size=64")
        if name not in fields:
            hint = " (use --codec)" if name == "codec" else ""
            raise CliError(f"--set {pair!r}: {name!r} is not a CompressConfig field{hint}; "
                           f"accepted fields: {', '.join(fields)}")
        try:
            out[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[name] = text.strip()
    return out


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:callable`` -> the callable (a model class or factory function)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"model {spec!r} is malformed; use MODULE:FACTORY, e.g. torchvision.models:resnet18")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(
            f"cannot import {module_name!r} (from {spec!r}): {e}; install it or add its directory to "
            f"PYTHONPATH, or give another MODULE:FACTORY, e.g. torchvision.models:resnet18"
        ) from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise CliError(
                f"{module_name!r} has no attribute {attr!r} (from {spec!r}); after the colon give the name "
                f"of a model class or factory function defined in {module_name}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise CliError(f"{spec!r} is not callable; give a model class or a function returning an nn.Module")
    return factory


def _progress(msg: str) -> None:
    print(f"[fxcompress] {msg}", file=sys.stderr, flush=True)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def _train(cm: nn.Module, inputs: Sequence[torch.Tensor], steps: int, label: str) -> float:
    """``steps`` SGD steps on a fixed batch; returns the last loss."""
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    cm.train()
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _loss(cm(*inputs))
        loss.backward()
        opt.step()
        what = "compile + step" if step == 0 else "step"
        _progress(f"{label}: {what} {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)")
    return loss.item()


def cmd_demo(args: argparse.Namespace) -> int:
    from .models import ResidualCNN, TinyTransformer

    codecs = [Codec(c) for c in args.codecs] if args.codecs else sorted(IMPLEMENTED_CODECS, key=list(Codec).index)
    if args.steps < 1:
        raise CliError(f"--steps {args.steps} is not accepted; use an int >= 1")
    shown = Codec(args.report) if args.report else codecs[-1]
    if shown not in codecs:
        raise CliError(f"--report {shown.value} is not among the codecs run ({', '.join(c.value for c in codecs)}); "
                       f"add it to --codecs or leave --report out")
    for factory in (ResidualCNN, TinyTransformer):
        summary, details = [], None
        for codec in codecs:
            torch._dynamo.reset()  # each config compiles afresh; keeps Dynamo's recompile limit away
            torch.manual_seed(0)
            model = factory()
            x = model.example_input()
            cm = api.compile(model, CompressConfig(codec=codec), backend=args.backend)
            loss = _train(cm, [x], args.steps, f"{factory.__name__} codec={codec.value}")
            report = api.explain(cm)
            summary.append((codec.value, report.saved_bytes_before, report.saved_bytes_after, loss))
            if codec is shown:
                details = report
        print(f"\n### {factory.__name__}, backend={args.backend}, {args.steps} steps")
        print(f"{'codec':<10} {'saved before':>14} {'saved after':>14} {'smaller':>8} {'last loss':>10}")
        for name, before, after, loss in summary:
            ratio = f"{before / after:.2f}x" if after else "all"
            print(f"{name:<10} {format_bytes(before):>14} {format_bytes(after):>14} {ratio:>8} {loss:>10.4f}")
        if details is not None:
            print(f"\nper saved tensor, codec={shown.value}:")
            print(details)
    return 0


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _capture(args: argparse.Namespace):
    """Build MODULE:FACTORY, compile it, run one training step on random inputs."""
    config = CompressConfig(codec=args.codec, **parse_settings(args.set))  # bad settings fail before the build
    factory = load_factory(args.model)
    inputs = [parse_input(s) for s in args.input]
    _progress(f"building {args.model}")
    try:
        model = factory()
    except TypeError as e:
        raise CliError(f"{args.model!r} cannot be called without arguments ({e}); give a model class or "
                       f"a function that builds the model with no arguments, e.g. a small module of your own") from None
    if not isinstance(model, nn.Module):
        raise CliError(
            f"{args.model!r} returned {type(model).__name__}, not an nn.Module; give a model class or a "
            f"function that returns a torch.nn.Module"
        )
    cm = api.compile(model, config, backend=args.backend)
    cm.train()
    amp = f", {args.autocast} autocast" if args.autocast else ""
    _progress(f"capturing one training step ({args.backend} backend{amp})")
    t0 = time.perf_counter()
    dtype = AUTOCAST.get(args.autocast)
    try:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = cm(*inputs)
            loss = _loss(out if isinstance(out, torch.Tensor) else out[0])
    except FxCompressError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, reported with the inputs that caused it
        shapes = ", ".join(args.input)
        raise CliError(f"{args.model} failed on --input {shapes}: {type(e).__name__}: {e}; give one --input "
                       f"per positional argument of its forward, with the shapes it expects") from None
    loss.backward()
    _progress(f"captured in {time.perf_counter() - t0:.1f}s")
    return cm


def cmd_explain(args: argparse.Namespace) -> int:
    print(api.explain(_capture(args)))
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize.timeline import output_format, timeline

    output_format(args.output)  # a bad path fails before the slow capture
    cm = _capture(args)
    _progress(f"drawing {args.output}")
    written = timeline(cm, args.output, max_lanes=args.max_lanes)
    print(written)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    codec_names = [c.value for c in Codec]
    backends = [b.value for b in Backend]

    d = sub.add_parser("demo", help="train built-in models a few steps and print each report")
    d.add_argument("--backend", choices=backends, default="eager")
    d.add_argument("--steps", type=int, default=3)
    d.add_argument("--codecs", nargs="*", choices=codec_names, help="default: every implemented codec")
    d.add_argument("--report", choices=codec_names, help="codec whose full report is printed (default: the last)")
    d.set_defaults(run=cmd_demo)

    e = sub.add_parser("explain", help="capture one training step of MODULE:FACTORY and print the report")
    _model_args(e)
    e.set_defaults(run=cmd_explain)

    v = sub.add_parser("visualize", help="capture one training step of MODULE:FACTORY and draw its memory timeline")
    _model_args(v)
    v.add_argument("-o", "--output", required=True, help="out.svg, out.png, out.pdf or out.dot")
    v.add_argument("--max-lanes", type=int, default=40, help="group saved tensors by module beyond this many lanes")
    v.set_defaults(run=cmd_visualize)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    codec_names = [c.value for c in Codec]
    p.add_argument("model", help="importable factory, e.g. torchvision.models:resnet18")
    p.add_argument("--input", action="append", required=True, help="8x3x224x224 or int:8x1024:50257 (repeatable)")
    p.add_argument("--codec", choices=codec_names, default="lossless")
    p.add_argument("--backend", choices=[b.value for b in Backend], default="eager")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other CompressConfig field, e.g. --set group_size=64 --set learning_rule=ara "
                        "(repeatable; see the README's configuration table)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST), help="capture the step under CPU autocast "
                   "to this dtype, as mixed-precision training runs it (default: off, the model's own dtypes)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FxCompressError as e:
        print(f"fxcompress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
