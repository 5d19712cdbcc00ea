"""The benchmark scripts' own logic: variant names, learning-rule specs, and the README's target verdicts."""
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import bench_step  # noqa: E402
import report  # noqa: E402
from common import compress_config  # noqa: E402


def test_specs_name_codecs_and_learning_rules():
    levels = {1: ("*.out",), 2: ("*.fc", "*.out")}
    assert compress_config("int4").codec.value == "int4"
    ara = compress_config("ara+int4", ara_stride=(3, 4, 2, 2))
    assert (ara.codec.value, ara.learning_rule.value, ara.ara_stride) == ("int4", "ara", (3, 4, 2, 2))
    asa = compress_config("asa2+int8", asa_layers=levels)
    assert (asa.codec.value, asa.learning_rule.value, asa.asa_layers) == ("int8", "asa", ("*.fc", "*.out"))
    assert compress_config("asa").asa_layers == "after_activation"
    with pytest.raises(SystemExit, match="ASA levels"):
        compress_config("asa4", asa_layers=levels)
    with pytest.raises(SystemExit, match="take '\\+CODEC'"):
        compress_config("int4+int8")
    assert compress_config("int4").stochastic_rounding and not compress_config("int4/det").stochastic_rounding
    with pytest.raises(SystemExit, match="'/det'"):
        compress_config("int4/nearest")
    both = compress_config("int4/det/triton")
    assert both.encoders == "triton" and not both.stochastic_rounding and compress_config("int4").encoders == "aten"


def test_variant_sets_expand_and_bad_names_stop_before_any_run():
    variants = bench_step.expand("resnet50", ["baselines", "fxcompress", "torch.compile"])
    assert variants[: len(bench_step.BASELINES)] == list(bench_step.BASELINES)
    assert "fxcompress ara+int4" in variants and "fxcompress blpa4" in variants
    assert variants.count("torch.compile") == 1
    assert "fxcompress asa4" in bench_step.expand("gpt2", ["fxcompress"])
    for name in variants:
        bench_step.wrap_for(name)
    with pytest.raises(SystemExit, match="is not accepted"):
        bench_step.wrap_for("torch.jit")


def _row(variant, items, act, **kw):
    return dict(model=kw.pop("model", "resnet50"), variant=variant, batch=256, items_per_s=items, step_ms=1.0,
                compile_s=kw.pop("compile_s", 50.0), steady_gib=1.0, peak_gib=act + 1, activation_gib=act,
                reserved_gib=act + 2, **kw)


def test_target_verdicts_say_met_or_missed():
    rows = [
        _row("torch.compile", 5600, 10.0),
        _row("fxcompress int4", 5100, 2.5, compile_s=60.0),  # 4.0x less at 0.91x: met
        _row("fxcompress int2", 4000, 1.5, compile_s=90.0),  # 6.7x less at 0.71x: missed
    ]
    base = {"resnet50": rows[0]}
    verdicts = report._targets(rows, base)
    assert any("int4" in v and "4.00×" in v and "**met**" in v for v in verdicts)
    assert any("int2" in v and "0.71×" in v and "**missed**" in v for v in verdicts)
    assert any("compile time" in v and "1.80×" in v and "**missed**" in v for v in verdicts)
    assert report._max_batch(rows[1]) == f"{int(256 * 39 / 2.5):,}"


def test_gpt2_target_reads_the_blocks_saved_bytes():
    rows = [
        _row("torch.compile", 280000, 10.0, model="gpt2"),
        _row("fxcompress int8", 260000, 7.0, model="gpt2", blocks_saved_gib_before=8.0, blocks_saved_gib_after=4.0),
    ]
    (verdict, *_) = report._targets(rows, {"gpt2": rows[0]})
    assert "2.00× less saved in the blocks" in verdict and "**met**" in verdict


def test_saved_rows_show_each_total_and_its_ratio():
    data = {"environment": {"device": "cpu", "cpu": "test CPU", "torch": "2.x"}, "commands": ["c"], "saved": [
        {"model": "gpt2", "codec": "int4", "batch": 2, "dropout": False,
         "gib": [2.0, 1.0], "activations_gib": [1.5, 0.5], "block_activations_gib": [1.2, 0.3]},
    ]}
    rows = report._saved(pathlib.Path("s.json"), data).splitlines()
    assert rows[-1] == "| gpt2 | 2 | off | int4 | 2.000 → 1.000 | 1.500 → 0.500 | 3.00 | 1.200 → 0.300 | 4.00 |"


def test_coverage_rows_show_the_uncoded_share_and_its_reasons():
    data = {"environment": {"device": "cpu", "cpu": "test CPU", "torch": "2.x"}, "commands": ["c"], "coverage": [
        {"model": "resnet18", "size": "batch 2", "backend": "eager", "codec": "int4", "saved_mib": [4.0, 0.5],
         "uncoded_share": 0.025, "uncoded": [{"reason": "tiny: N B < min_bytes=N", "tensors": 3, "share": 0.02},
                                             {"reason": "a | b", "tensors": 1, "share": 0.005}]},
    ]}
    rows = report._coverage(pathlib.Path("c.json"), data).splitlines()
    assert rows[-1] == ("| resnet18 | batch 2 | eager | int4 | 4.00 → 0.50 | 8.00 | 2.5% | – | "
                        "2.0% tiny: N B < min_bytes=N (3); 0.5% a / b (1) | – |")  # NB: rows before the gradient check
    data["coverage"][0] |= {"grad_cosine": 0.987654321, "commit": "abc1234"}  # and before rows named their commit
    assert "| 2.5% | 0.98765 | 2.0% tiny" in report._coverage(pathlib.Path("c.json"), data)
    assert report._coverage(pathlib.Path("c.json"), data).endswith("a / b (1) | abc1234 |")


def test_architectures_runs_a_zoo_model_and_groups_like_reasons():
    import architectures

    assert architectures.reason_class("view of saved tensor mm_2: stored once") == "view of saved tensor X: stored once"
    assert architectures.reason_class("tiny: 512 B < min_bytes=1024") == "tiny: N B < min_bytes=N"
    assert architectures.reason_class("values read by le.Tensor; torch.int8 is not quantized").endswith("torch.int8 is not quantized")
    row = architectures.coverage("convnet", "eager", "int4")
    before, after = row["saved_mib"]
    assert 0 < after < before / 4 and 0 <= row["uncoded_share"] < 0.05
    assert sum(u["share"] for u in row["uncoded"]) <= row["uncoded_share"] + 1e-12


def test_traffic_rows_sum_passes_and_count_fused_codec_kernels():
    def graph(variant, pass_, by_role):
        return {"model": "resnet", "variant": variant, "batch": 32, "graph": 0 if pass_ == "forward" else 1,
                "pass": pass_, "kernels": sum(k for k, _ in by_role.values()), "gib": sum(g for _, g in by_role.values()),
                "by_role": {r: {"kernels": k, "gib": g} for r, (k, g) in by_role.items()}}

    data = {"environment": {"device": "cpu", "cpu": "test CPU", "torch": "2.x"}, "commands": ["c"], "traffic": [
        graph("plain", "forward", {"model": (10, 1.0)}), graph("plain", "backward", {"model": (10, 1.0)}),
        {**graph("int4", "forward", {"model": (10, 1.0), "encode": (4, 0.5), "model+encode": (2, 0.1)}),
         "first_step_s": 12.3},
        graph("int4", "backward", {"model": (10, 1.0), "model+decode": (3, 0.4), "model+encode+decode": (1, 0.0)}),
    ]}
    rows = report._traffic(pathlib.Path("t.json"), data).splitlines()
    int4 = next(r for r in rows if "| int4 |" in r)
    # 16 + 14 kernels; 1.6 + 1.4 GiB = 1.5x plain's 2 GiB; 4 encoders alone, 3 fused; none alone, 4 fused
    assert int4 == "| resnet | 32 | int4 | 16 / 14 | 1638.4 / 1433.6 | 1.50 | 4 (512.0) | 3 | 0 (0.0) | 4 | 12 |"
    # rows without a first step's time predate the counting of multi-output calls as one kernel
    assert "| plain | 10 / 10 † |" in next(r for r in rows if "| plain |" in r) and any(r.startswith("† ") for r in rows)


def test_an_encode_op_counts_as_its_kernels_and_a_triton_variant_has_them():
    import traffic

    import fxcompress
    from common import build, compress_config

    rows = traffic.traffic("convnet", "int4/triton", "cpu", 2)  # max pools, batch-norms, ReLU masks
    fw = next(r for r in rows if r["pass"] == "forward")
    # the same rewrite (Inductor's partitioner), run as it is: how many encode ops the step has
    work = build("convnet", "cpu", 2)
    config = fxcompress.CompressConfig(**{**vars(compress_config("int4/triton")), "base_partitioner": "min_cut"})
    cm = fxcompress.compile(work.model, config, backend="eager")
    work.loss_fn(cm(*work.inputs)).backward()
    ops = sum(n.target is torch.ops.fxcompress.affine_encode.default
              for c in cm.capture_log.captures() for n in c.rewritten.fw.graph.nodes)
    # each op is a kernel, its three outputs are not, and it makes its draws itself: besides the ops, the 1-bit
    # masks' and the packed max-pool offsets' packs (standalone or fused into their producer, as Inductor's
    # version decides) and the graph's one seed (two kernels: Inductor's seeds, then the randint that reads them).
    # A norm input's op reads the norm's statistics, views of model nodes, so Inductor's origins for it
    # name model code too: traffic.py classes it "model+encode"
    report = fxcompress.explain(cm).rows
    masks = sum(r.codec.startswith("mask[") for r in report)
    # Inductor saves a max pool's window offsets (packed[4b]), where this eager rewrite has its indices
    masks += sum(isinstance(m, torch.nn.MaxPool2d) for m in work.model.modules())
    normalized = sum(r.codec.endswith("/normalized") for r in report)
    kernels = fw["by_role"]["encode"]["kernels"]
    assert ops and masks and normalized, (ops, masks, normalized)
    assert ops - normalized <= kernels <= ops - normalized + masks + 2, (ops, masks, normalized, kernels)
    assert fw["by_role"]["model+encode"]["kernels"] >= normalized
    assert rows[0]["first_step_s"] > 0


def test_triton_codegen_says_what_is_missing_and_the_table_says_not_run(monkeypatch):
    import importlib.util

    import traffic

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    with pytest.raises(SystemExit, match="pip install triton"):
        with traffic.triton_codegen_only():
            pass
    data = {"environment": {"device": "cpu", "cpu": "test CPU", "torch": "2.x"}, "commands": ["c"], "traffic": [
        {"model": "resnet", "variant": "plain", "batch": 32, "graph": 0, "pass": "forward", "codegen": "triton",
         "kernels": 1, "gib": 1.0, "by_role": {"model": {"kernels": 1, "gib": 1.0}}}]}
    assert "generated but not run" in report._traffic(pathlib.Path("t.json"), data)


def test_kernel_time_goes_to_its_roles_and_only_cuda_counts_the_rest_as_extern():
    import collections

    import traffic

    kernels = {"triton_a": [{"model", "encode"}, 4e6], "triton_b": [{"decode"}, 1e6]}
    times = collections.Counter({"triton_a": 2.0, "triton_b": 8.0, "sm90_xmma_conv": 6.0, "triton_z": 1.0})
    cuda = traffic._timing(times, kernels, cuda=True, steps=2)
    assert cuda["ms"] == {"decode": 4.0, "extern": 3.0, "model+encode": 1.0, "unmatched": 0.5}
    assert cuda["gb_s"] == {"decode": 1e6 / 4.0 / 1e6, "model+encode": 4e6 / 1.0 / 1e6}
    assert [k["kernel"] for k in cuda["slowest"]] == ["triton_b", "triton_a"]
    cpu = traffic._timing(times, kernels, cuda=False, steps=2)
    assert "extern" not in cpu["ms"] and cpu["ms"]["unmatched"] == 0.5


def test_profiled_cpu_step_attributes_every_generated_kernel():
    import traffic

    rows = traffic.traffic("convnet", "int4", "cpu", 2, time_steps=1)  # dropout and max pools too
    fw, bw = (next(r for r in rows if r["pass"] == p) for p in ("forward", "backward"))
    assert "unmatched" not in fw["ms"] and "unmatched" not in bw["ms"]
    assert any("encode" in role for role in fw["ms"]) and any("decode" in role for role in bw["ms"])
    assert all(k["ms"] > 0 and k["mib"] > 0 for k in fw["slowest"] + bw["slowest"])


@pytest.mark.parametrize("variant", ["fxcompress", "fxcompress/det", "triton", "two-pass", "two-pass/sr", "words"])
def test_encoder_candidates_round_trip_within_a_step_and_move_their_bytes(variant):
    """bench/encoders.py's candidates are experiments beside the library's codec: each must decode
    within one step of x (measure() checks it before timing) and store G*4/8 bytes of codes a group."""
    import encoders

    row = encoders.measure(variant, (2, 64, 8, 8), "cpu", iters=1)
    groups = 2 * 64 * 8 * 8 // encoders.GROUP
    x_mib = 2 * 64 * 8 * 8 * 2 / 2**20
    assert row["mib"] == pytest.approx(x_mib + groups * (encoders.GROUP // 2 + 8) / 2**20)
    assert row["ms"] > 0 and row["decode_ms"] > 0


def test_an_encoder_that_decodes_wrong_is_caught(monkeypatch):
    import encoders

    monkeypatch.setattr(encoders.TwoPass, "decode", lambda self, packed, lo, scale: self.layout.unflatten(
        torch.zeros(self.layout.numel, dtype=self.layout.dtype)))
    with pytest.raises(AssertionError, match="two-pass: decodes .* beyond one step"):
        encoders.measure("two-pass", (2, 64, 8, 8), "cpu", iters=1)


def test_cpu_peak_is_the_most_bytes_held_at_once():
    """bench/peak.py's CPU measurement: the allocator events summed in time order."""
    import peak

    def fn():
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(3_000_000, dtype=torch.uint8)
        del a
        c = torch.empty(2_000_000, dtype=torch.uint8)  # b and c: 5 MB, more than a and b
        del b, c

    kept = torch.empty(10)  # allocated before: not part of the peak
    assert peak.cpu_peak(fn) == 5_000_000
    del kept


def test_the_triton_proxy_runs_a_step_with_empty_kernels_and_real_buffers(tmp_path):
    """``bench/peak.py --codegen triton``: the step's Triton code runs on the CPU, each kernel a no-op on
    zeroed buffers (max-pool's indices stay in range), so its buffers are allocated and freed as on a GPU."""
    import json

    out = tmp_path / "peak.json"
    cmd = [sys.executable, str(BENCH / "peak.py"), "--device", "cpu", "--backends", "inductor", "--models", "convnet",
           "--codecs", "int4", "--batch", "4", "--codegen", "triton", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["peak"]
    assert row["codegen"] == "triton" and row["backend"] == "inductor" and row["batch"] == 4
    assert 0 < row["measured_gib"] < row["predicted_before_gib"]
    assert "| convnet | 4 | inductor/triton | int4 |" in report._peak(out, json.loads(out.read_text()))
    bad = subprocess.run(cmd[:3] + ["cuda"] + cmd[4:], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--device cpu --backends inductor" in bad.stderr


def test_a_results_row_with_its_commit_reads_back_as_a_measurement(monkeypatch):
    from common import Measurement, open_results, put_result

    monkeypatch.setenv("FXCOMPRESS_COMMIT", "abc1234")
    data = open_results(None, "results", "cpu", "bench/bench_step.py")
    row = {"model": "resnet", "variant": "torch.compile", "batch": 2, "items_per_s": 10.0, "step_ms": 1.0,
           "compile_s": 1.0, "steady_gib": 0.1, "peak_gib": 0.2, "activation_gib": 0.1, "reserved_gib": 0.3}
    put_result(None, data, "results", row, same=("model", "variant", "batch"))
    assert data["results"][0]["commit"] == "abc1234"
    assert Measurement.of(data["results"][0]) == Measurement(**row)


def test_a_results_row_says_when_the_measured_code_differs_from_its_commit(monkeypatch):
    import common

    monkeypatch.delenv("FXCOMPRESS_COMMIT", raising=False)
    answers = {"rev-parse": "abc1234", "status": " M fxcompress/rewrite.py"}
    monkeypatch.setattr(common, "_git", lambda *args, cwd: answers[args[0]])
    assert common._commit() == "abc1234+dirty"
    answers["status"] = ""
    assert common._commit() == "abc1234"
    answers["rev-parse"] = None
    assert common._commit() is None


def test_a_child_measurement_compiles_with_empty_caches_of_its_own():
    import os

    from common import run_child

    code = "import json, os; print('RESULT ' + json.dumps([os.environ[k] for k in ('TORCHINDUCTOR_CACHE_DIR', 'TRITON_CACHE_DIR')]))"
    first = run_child([sys.executable, "-c", code], "cache dirs")
    second = run_child([sys.executable, "-c", code], "cache dirs")
    assert not set(first) & set(second)  # a directory per child ...
    assert not any(os.path.exists(os.path.dirname(d)) for d in first + second)  # ... removed after it


def test_compile_time_gives_cold_runs_beside_plain(tmp_path):
    import json
    import statistics
    import subprocess

    out = tmp_path / "compile_time.json"
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "compile_time.py"
    done = subprocess.run([sys.executable, str(script), "--backend", "eager", "--models", "mlp", "--variants", "plain",
                           "int4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["compile_time"]}
    runs = rows["int4"]["runs_s"]
    assert len(runs) == 1 and rows["int4"]["first_step_s"] == statistics.median(runs)  # --repeat: more runs
    assert rows["plain"]["fxcompress_s"] == 0 < rows["int4"]["fxcompress_s"] and rows["int4"]["traces"] > 0
    section = report._compile_time(out, data)
    ratio = rows["int4"]["first_step_s"] / rows["plain"]["first_step_s"]
    assert f"| mlp | default | eager | int4 | {rows['int4']['first_step_s']:.1f} | {ratio:.2f} |" in section
    assert "at most 1.3×" in section


def test_the_triton_build_compiles_each_generated_kernel_for_an_h100():
    """``compile_time.py --codegen triton-build``: every kernel the proxy generates is compiled, each
    autotuning config to an sm_90 cubin, by Triton and its ptxas on this CPU, inside the step."""
    import traffic

    build = traffic.TritonBuild()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU())
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), traffic.triton_codegen_only(run_empty=True, build=build):
        torch.compile(model)(torch.randn(8, 16)).sum().backward()
    torch._dynamo.reset()
    assert build.kernels >= 2 and build.binaries >= build.kernels  # forward and backward; some with several configs
    assert build.cubin_bytes > 1000 * build.binaries and build.seconds > 0


def test_built_compile_rows_show_the_triton_compile_beside_the_proxy():
    row = {"model": "resnet50", "variant": "int4", "batch": 8, "backend": "inductor", "codegen": "triton-build",
           "first_step_s": 90.0, "fxcompress_s": 2.0, "inductor_s": [10.0, 20.0], "runs_s": [90.0],
           "triton_build_s": 50.0, "kernels": 480, "binaries": 700}
    plain = {**row, "variant": "plain", "first_step_s": 60.0, "fxcompress_s": 0.0, "kernels": 400}
    data = {"compile_time": [plain, row], "environment": {"device": "cpu", "torch": "2.13.0", "date": "2026-12-05"},
            "commands": ["python bench/compile_time.py --codegen triton-build"]}
    section = report._compile_time(pathlib.Path("c.json"), data)
    assert "| resnet50 | 8 | inductor (Triton proxy + H100 build) | int4 | 90.0 | 1.50 | 2.0 | 10.0 / 20.0 | 50.0 (480) |" \
        in section
    assert "sm_90" in section
