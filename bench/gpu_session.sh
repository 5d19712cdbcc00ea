#!/usr/bin/env bash
# One device call that measures what the open issues most need, in priority order, within a
# deadline: a lent GPU session has about 15 minutes of device time in all (start-up included),
# and one call may run 10 minutes. Each step starts only if the time it is budgeted still fits,
# runs under `timeout`, and copies what it wrote to $OUT at once, so a step cut short loses
# only itself. Run from the repository root on the device machine:
#
#     bash bench/gpu_session.sh            # DEADLINE=560 seconds by default
#     DEADLINE=300 STEPS="tests step" bash bench/gpu_session.sh
#     FXCOMPRESS_COMMIT=abc1234 BUDGET_step=330 TESTS_K="nccl_ddp" bash bench/gpu_session.sh
#
# FXCOMPRESS_COMMIT names the commit in the results' rows (the device's copy of the tree has no
# .git); BUDGET_<step> overrides a step's budget; TESTS_K narrows the tests step's -k expression;
# TRAFFIC_VARIANTS replaces "int4/triton" (plain's and int4's rows at f220ec4 stay in the file:
# plain's kernels do not change with fxcompress's code).
#
# A call of 570 s left 329 s of a 15-minute budget on 2026-11-30 (the start took about a
# minute): a second call made at once, on the still-warm machine (it waits 30 s), can run
# what the first skipped, e.g. STEPS="blpa" DEADLINE=280. Budgets are what a fresh machine
# needs (no compile caches): on 2026-12-01 a 100 s tests budget ran only 2 tests (all 12 took
# 137 s earlier that day); the python start check itself takes about 10 s of DEADLINE.
#
# Then, here: copy $OUT's bench/results files into bench/results/, `python bench/report.py`,
# commit with the device, torch version and this command. Steps (STEPS picks some, in order):
#   tests    tests/test_gpu.py and the CUDA cases of test_lossless.py and test_reliability.py:
#            NCCL DDP/FSDP2 with int4, lossless on CUDA, SR reproducibility, memory over 200 steps
#   predict  issue 4: predicted vs measured step peak, eager backend (bench/peak.py)
#   ipeak    the same under Inductor, ResNet-50 none/int4/int2: the plan's model of what Inductor's
#            Triton code writes out (passes/liveness.py, inlined_nodes), checked so far only on
#            the CPU proxy (b32: -0.6/+1.6/+1.9%)
#   encoders int4 encoders timed alone on ResNet-50-sized tensors, aten (as Inductor compiles it)
#            against encoders="triton"'s kernel, beside a copy (bench/encoders.py)
#   traffic  what Triton fuses of the codecs (kernel roles and bytes) and where the time goes
#            (ms and GB/s by role, slowest kernels), ResNet-50 batch 64, plain and int4
#   peak     what is live at ResNet-50 int4's memory peak (batch 256), and the top kernels
#   step     issue 3's targets: ResNet-50 batch 256 bf16, torch.compile vs fxcompress int4, and
#            int4 and int2 with encoders="triton" (int2 with aten encoders: 0.72x at 724dc3b)
#   blpa     ResNet-50 blpa4 and int8 beside the rows of `step` (issue 3's table)
#   compile  issue 6's compile time, cold: ResNet-50 plain, int4, int4/triton, with Inductor's forward
#            and backward compile and fxcompress's own seconds (bench/compile_time.py)
#   gpt2     GPT-2 small 16 x 1024: torch.compile vs lossless/int8/int4 (issues 2 and 6)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-560}
STEPS=${STEPS:-step tests encoders predict ipeak traffic compile blpa gpt2 peak}
H=$(python3 -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'; print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
mkdir -p "$OUT/bench/results" "$OUT/logs"
start=$SECONDS

run_step() {  # NAME BUDGET_SECONDS COMMAND...: run if BUDGET (or $BUDGET_<NAME>) still fits before the deadline
    local name=$1 over="BUDGET_$1"; local budget=${!over:-$2}; shift 2
    local left=$((DEADLINE - (SECONDS - start)))
    if ((left < budget)); then
        echo "[session] skip $name: $left s left, budgeted $budget s"
        return
    fi
    echo "[session] $name (budget $budget s, $left s left): $*"
    timeout "$budget" "$@" 2>&1 | tee "$OUT/logs/$name.log"
    echo "[session] $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
    cp bench/results/*_"$H".json "$OUT/bench/results/" 2>/dev/null || true  # <= 8 files come back
}

python3 -c "import torch, fxcompress; print('[session]', torch.__version__, torch.cuda.get_device_name())" || exit 1
for s in $STEPS; do
    case $s in
        # compile times on an H200 (2026-11-30): torch.compile 33 s, int4 111 s, int2 131 s; the step ran 345 s.
        # Since 2026-12-01 each variant compiles cold (common.run_child: caches of its own), as
        # issue 6's compile-time column asks; until then a variant could reuse another's kernels
        step) run_step step 420 python3 bench/bench_step.py --models resnet50 --steps 10 --timeout 200 \
                  --variants torch.compile "fxcompress int4" "fxcompress int4/triton" "fxcompress int2/triton" \
                  --out "bench/results/step_$H.json" ;;
        # 177 s for plain and int4 on an H200 (2026-11-30), before --time
        traffic) run_step traffic 240 python3 bench/traffic.py --device cuda --models resnet50 --batch 64 \
                  --variants ${TRAFFIC_VARIANTS:-int4/triton} --time 5 --out "bench/results/traffic_$H.json" ;;
        # issue 4: the plan's peak against max_memory_allocated, eager backend, ResNet-50 b64 and
        # GPT-2 8 x 1024, none and int4 (the H100's none rows predate the boxed-call fix, 59795f1)
        predict) run_step predict 240 python3 bench/peak.py --device cuda --backends eager \
                  --out "bench/results/peak_$H.json" ;;
        # one cold Inductor compile per codec (ResNet-50 b64 on an H200: 33 s plain, about 110 s int4)
        ipeak) run_step ipeak 330 python3 bench/peak.py --device cuda --models resnet50 --backends inductor \
                  --codecs none int4 int2 --out "bench/results/peak_$H.json" ;;
        # the int4 encoder alone, aten against the Triton kernel, beside a copy (the other
        # formulations of bench/encoders.py are there to run by hand)
        encoders) run_step encoders 180 python3 bench/encoders.py --device cuda --variants copy fxcompress triton \
                  triton/det --out "bench/results/encoders_$H.json" ;;
        peak) run_step peak 200 python3 bench/where_peak.py --model resnet50 --variant "fxcompress int4" --top 15 ;;
        # 85 s for test_gpu.py on an H200 (2026-11-30), 137 s for 12 tests on a fresh machine; since
        # 2026-12-01 ten more (the Triton encoder's; two compile a step). The CUDA cases of the CPU files beside it
        tests) run_step tests 300 python3 -m pytest -q -rA -p no:logging tests/test_gpu.py \
                  tests/test_lossless.py tests/test_reliability.py -k "${TESTS_K:-cuda or test_gpu}" ;;
        blpa) run_step blpa 330 python3 bench/bench_step.py --models resnet50 --steps 10 --timeout 200 \
                  --variants "fxcompress blpa4" "fxcompress int8" --out "bench/results/step_$H.json" ;;
        gpt2) run_step gpt2 420 python3 bench/bench_step.py --models gpt2 --steps 10 --timeout 200 \
                  --variants torch.compile "fxcompress int8" "fxcompress int4" --out "bench/results/step_$H.json" ;;
        # cold compile times with Inductor's forward/backward split and fxcompress's share (the CPU
        # proxy: int4/triton 1.32x plain, the decoders +5.8 s in the backward; Triton's own compile only here)
        compile) run_step compile 300 python3 bench/compile_time.py --device cuda --models resnet50 --batch 64 \
                  --variants plain int4 int4/triton --out "bench/results/compile_time_$H.json" ;;
        *) echo "[session] unknown step $s (known: tests predict ipeak encoders step traffic blpa gpt2 peak compile)"; exit 2 ;;
    esac
done
echo "[session] done after $((SECONDS - start)) s; results in $OUT/bench/results"
