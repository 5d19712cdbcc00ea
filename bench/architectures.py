"""Coverage: the share of each architecture's saved activation bytes that a codec codes (no GPU needed).

    python bench/architectures.py --backends eager inductor --codec int4 --out bench/results/architectures_cpu.json

One training step per model and backend, captured on this machine's CPU in
fp32 at a small size (torchvision's classifiers at batch 2 and 64x64 pixels,
transformers' language models shrunk to 2 layers of width 128 at batch 2 and
64 tokens): what is measured is which saved tensors each architecture's
graphs hold and what fxcompress does to each, not memory at scale. For each
model, the activations (all saved tensors but graph inputs and tensors made
from parameters alone) before and after the codec, the share left uncoded,
and the reasons of the largest uncoded groups, from ``fxcompress.explain``;
and the cosine similarity of the step's weight gradients to the plain model's,
run eagerly, dropout and stochastic depth off in both (the codec's error and the compiler's
reordering together; a NaN gradient shows as ``nan``). ``gpt2-ckpt`` is GPT-2 with Hugging Face's gradient
checkpointing, which saves its additive attention mask for the recomputation.
Each run is a child process with empty compile caches. Models not importable
here are skipped with a message: the committed CPU results used torchvision
0.28.0's pure-Python models and transformers 5.25 (bench/saved.py says how
they were installed beside the CPU torch wheel) and timm 1.0.31 (``pip install --no-deps timm==1.0.31``).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fxcompress  # noqa: E402
from common import open_results, put_result, run_child  # noqa: E402

VISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121",
          "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_16", "swin_t")
LANGUAGE = ("gpt2", "gpt2-ckpt", "bert", "llama", "phi3")
# timm's models, with what their constructors need at 64 px: each one a pattern the others lack
TIMM = {
    "repvgg_a0": {},  # a batch-norm on each block's input beside its convolutions (the identity branch)
    "efficientvit_b0": {},  # ReLU linear attention: a quotient by a normalizer
    "xcit_nano_12_p16_224": {"img_size": 64},  # cross-covariance attention, class-token layer norms
    "cait_xxs24_224": {"img_size": 64},  # class attention, layer scale
    "coat_lite_tiny": {"img_size": 64},  # factorized attention, convolutional position encoding
    "pit_ti_224": {"img_size": 64},  # pooling by depthwise convolution between transformer stages
    "mobilevit_xxs": {},  # convolutions and transformers unfolded into patches
    "poolformer_s12": {},  # average pooling as the token mixer, group norm
    "convnext_atto": {},  # depthwise 7x7, layer norm over channels, GELU
    "ghostnet_100": {},  # half of each feature map made by a cheap depthwise convolution, squeeze-excite
    "lcnet_050": {},  # hard-swish, depthwise separable convolutions
    "resnest14d": {},  # split attention: a softmax over radix groups
    "skresnet18": {},  # selective kernels: a softmax over two convolution branches
    "nf_resnet26": {},  # no normalization: weight-standardized convolutions, scaled residuals
    "dla34": {},  # deep layer aggregation: trees of concatenations
    "cspresnet50": {},  # cross-stage partial blocks: half the channels bypass each stage
}
MiB = 1024**2


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def build(name: str) -> tuple[nn.Module, torch.Tensor, str]:
    """A model of ``name``, its input and a description of the size measured."""
    torch.manual_seed(0)
    if name in VISION:
        import torchvision.models

        model = getattr(torchvision.models, name)(**({"image_size": 64} if name == "vit_b_16" else {}))
        return model, torch.randn(2, 3, 64, 64), "batch 2, 64x64"
    if name in LANGUAGE:
        return _Logits(_language_model(name)), torch.randint(0, 1000, (2, 64)), "2 layers, width 128, batch 2x64"
    if name in TIMM:
        import timm

        # NB: timm's heads drop out with F.dropout (no module to turn off): drop_rate=0 at construction
        return timm.create_model(name, drop_rate=0.0, **TIMM[name]), torch.randn(2, 3, 64, 64), "batch 2, 64x64"
    from fxcompress.models import ZOO  # the test zoo: CPU smoke runs of this script

    model = ZOO[name]()
    return model, model.example_input(2), "test zoo, batch 2"


def _language_model(name: str) -> nn.Module:
    import transformers as T

    small = dict(vocab_size=1000, use_cache=False)
    if name.startswith("gpt2"):
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **small))
        if name == "gpt2-ckpt":
            model.gradient_checkpointing_enable()
        return model
    if name == "bert":
        cfg = T.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **small)
        return T.BertForMaskedLM(cfg)
    decoder = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, pad_token_id=0, **small)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**decoder))
    return T.Phi3ForCausalLM(T.Phi3Config(**decoder))  # gate and up projections fused, then split


def reason_class(reason: str) -> str:
    """A report reason with its numbers and node names generalized, so that like reasons group."""
    reason = re.sub(r"saved tensor \w+", "saved tensor X", reason)
    return re.sub(r"\b\d+\b", "N", reason)  # NB: whole numbers: "torch.int8" stays


def coverage(name: str, backend: str, codec: str) -> dict:
    model, x, size = build(name)
    model.train()
    for m in model.modules():  # NB: a compiled step draws other dropout masks than an eager one
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
            m.p = 0.0  # NB: torchvision's stochastic depth (EfficientNet, ConvNeXt, Swin) drops whole rows
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():  # NB: ViT's zero-initialized head: no gradient would pass it
                p.normal_(std=0.02)
    plain = copy.deepcopy(model)
    _step(plain, x)
    module = fxcompress.compile(model, fxcompress.CompressConfig(codec=codec), backend=backend)
    _step(module, x)
    rows = [r for r in fxcompress.explain(module).rows if r.counted and not r.from_parameters]
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    uncoded: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for r in (r for r in rows if r.codec == "none"):
        reason = reason_class(r.reason)
        uncoded[reason] += r.bytes_before
        count[reason] += 1
    return {
        "model": name, "backend": backend, "codec": codec, "size": size,
        "saved_mib": [before / MiB, after / MiB],
        "uncoded_share": sum(uncoded.values()) / before if before else 0.0,
        "grad_cosine": _cosine(plain, model),
        "uncoded": [{"reason": k, "tensors": count[k], "share": b / before} for k, b in uncoded.most_common(3)],
    }


def _step(module: nn.Module, x: torch.Tensor) -> None:
    module(x).float().pow(2).mean().backward()


def _cosine(a: nn.Module, b: nn.Module) -> float:
    """Cosine similarity of the two models' weight gradients, all parameters as one vector (NaN where
    either is zero: undefined, not 0)."""
    grads = [torch.cat([p.grad.flatten().double() for p in m.parameters() if p.grad is not None]) for m in (a, b)]
    if not all(g.any() for g in grads):
        return float("nan")
    return float(torch.nn.functional.cosine_similarity(*grads, dim=0))


def _available(name: str) -> bool:
    module = ("torchvision" if name in VISION else "transformers" if name in LANGUAGE else "timm" if name in TIMM
              else "fxcompress")
    try:
        __import__(module)
    except ImportError:
        print(f"[architectures] {name}: {module} is not importable here; skipped", file=sys.stderr)
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=[*VISION, *LANGUAGE, *TIMM])
    p.add_argument("--backends", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    p.add_argument("--codec", default="int4")
    p.add_argument("--out", help="results JSON to add rows to (key 'coverage')")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(coverage(*args.child, args.codec)), flush=True)
        return
    results = open_results(args.out, "coverage", "cpu", " ".join(["python", *sys.argv]))
    print(f"{'model':<20} {'backend':<9} {'saved MiB':>18} {'x':>6} {'uncoded':>8} {'grad cos':>9}  largest uncoded")
    for model in filter(_available, args.models):
        for backend in args.backends:
            print(f"[architectures] {model} / {backend} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--codec", args.codec, "--child", model, backend]
            row = run_child(cmd, f"[architectures] {model} / {backend}", timeout=1800)
            if row is None:
                continue
            (b, a), top = row["saved_mib"], row["uncoded"]
            first = f"{top[0]['share']:.1%} {top[0]['reason']}" if top else ""
            print(f"{model:<20} {backend:<9} {b:8.2f} -> {a:7.2f} {b / a if a else 0:6.2f} "
                  f"{row['uncoded_share']:8.1%} {row['grad_cosine']:9.5f}  {first}", flush=True)
            put_result(args.out, results, "coverage", row, ("model", "backend", "codec"))


if __name__ == "__main__":
    main()
