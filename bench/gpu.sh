#!/usr/bin/env bash
# The GPU measurements BENCHMARKS.md asks for. Parts run in the order given (`bench/gpu.sh decode train-gpt2`).
#
#   bench/gpu.sh cuda-tests        # tests/test_cuda.py: the GPU paths are right before they are timed
#   bench/gpu.sh decode            # TinyLlama-1.1B shape, bf16, batch 1 and 32, compiled, against transformers,
#                                  # then int8 weights at batch 1, all in one process (int8: an alias)
#   bench/gpu.sh train-gpt2        # GPT-2 124M at 12 x 1024, bf16, compiled: MFU against transformers
#   bench/gpu.sh train-tinyllama   # TinyLlama-1.1B at 4 x 2048, bf16, compiled
#   bench/gpu.sh shakespeare       # recipes/shakespeare-char.yaml end to end: best validation loss, step, time
#   bench/gpu.sh loss              # the chunked output-head loss against the plain one, Llama 3's head, bf16
#   bench/gpu.sh train | all       # both training parts | everything (cuda-tests, decode, train-gpt2,
#                                  # shakespeare, train-tinyllama: the issues' targets first; then loss)
#
# Runs from the repository root with the machine's own Python (PYTHON=python3 by default) and lmstack from
# src/, so nothing is installed: the device image carries torch, transformers, tokenizers, safetensors,
# pyyaml, tqdm, jinja2, matplotlib and pytest. Logs go to $LOG_DIR (default: $OUT where
# that is set, as on the device machine, whose $OUT comes back; else bench-logs/). Each part should fit in
# ten minutes on an H100, most of it compilation (not yet checked: no GPU has run it). Output is line-buffered
# so that a part cut off at a time limit keeps what it printed. SHAKESPEARE_ARGS adds overrides to the recipe
# (a quick check on a CPU: SHAKESPEARE_ARGS="--max_steps 20 --eval_interval 10 --eval_batches 2 --compile false").
# DECODE_BATCH picks decode's batch sizes (default "1 32").
# PART_TIMEOUT=SECONDS stops any one command of a part after that long, so that one slow part cannot take a
# whole call of a short lease (a lent machine gives a session about 15 minutes in all, its start included).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-${OUT:-bench-logs}}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# What would cost a short lease its figures, logged as it happens: a CUDA graph skipped (perf_hints), a
# recompile and why, a graph break. TORCH_LOGS= (empty) turns them off.
export TORCH_LOGS=${TORCH_LOGS-perf_hints,recompiles,graph_breaks}
mkdir -p "$LOG_DIR"

run() {  # run NAME COMMAND...: print and log; returns the command's exit status
    echo "== $1: ${*:2}"
    local start=$SECONDS status=0 limit=()
    [ -z "${PART_TIMEOUT:-}" ] || limit=(timeout -k 10 "$PART_TIMEOUT")
    "${limit[@]}" "${@:2}" 2>&1 | { grep --line-buffered -v -e "it/s]" -e "^Loading weights" || true; } \
        | tee "$LOG_DIR/$1.log" || status=$?
    if [ "$status" = 0 ]; then echo "== $1: $((SECONDS - start)) s"
    elif [ "$status" = 124 ]; then echo "== $1: STOPPED after PART_TIMEOUT=${PART_TIMEOUT}s (what it printed is above)"
    else echo "== $1: FAILED (exit $status)"; fi
    return "$status"
}

cuda_tests() {  # needs pytest, as the device image has it
    run cuda-tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
}

decode() {  # one process: the 1.1B model is built, saved for transformers and compiled once per engine
    # int8 at batch 1 only: at 32 rows Inductor no longer fuses the int8-to-bf16 conversion into the matmul
    # DECODE_BATCH="1" leaves out batch 32 (and its compilation) when a call's time is short.
    # shellcheck disable=SC2086
    run decode-tinyllama "$PYTHON" bench/decode.py --shape tinyllama-1.1b --dtype bfloat16 --batch ${DECODE_BATCH:-1 32} \
        --compile --new-tokens 128 --quantize 8 --quantize-batch 1
}

train_gpt2() {
    run train-gpt2 "$PYTHON" bench/train_throughput.py --shape gpt2 --batch 12 --seq 1024 --precision bf16 --compile
}

train_tinyllama() {
    run train-tinyllama "$PYTHON" bench/train_throughput.py --shape tinyllama-1.1b --batch 4 --seq 2048 \
        --precision bf16 --compile --repeat 3
}

loss() {  # eager bf16 autocast, as an uncompiled training run computes it
    run loss-llama3-head "$PYTHON" bench/loss.py --device cuda --tokens 8192 --dim 2048 --vocab 128256 --precision bf16
    # the chunk size before session 18 (512 rows, not 2,048): what the larger chunks save in weight-gradient traffic
    run loss-llama3-head-512 "$PYTHON" bench/loss.py --device cuda --tokens 8192 --dim 2048 --vocab 128256 \
        --precision bf16 --chunk-rows 512
}

shakespeare() {
    # Data and checkpoints go to scratch space; the log, metrics.jsonl and loss.png to $LOG_DIR.
    local scratch=${SCRATCH:-${TMPDIR:-/tmp}/lmstack-bench}
    local data=$scratch/shakespeare-char-data run_dir=$scratch/shakespeare-char
    rm -rf "$run_dir"  # a benchmark starts from nothing (an earlier run there would be refused)
    # No samples at evaluations: nanoGPT's 129 s include none.
    run prepare "$PYTHON" -m lmstack.cli data prepare --input data/tinyshakespeare.txt --tokenizer char \
        --output "$data" || return
    local status=0
    run shakespeare "$PYTHON" -m lmstack.cli pretrain --config recipes/shakespeare-char.yaml --data "$data" \
        --out_dir "$run_dir" --compile true --progress false --sample_tokens 0 ${SHAKESPEARE_ARGS:-} || status=$?
    # What the run logged comes back even when it was stopped or failed: its evaluations so far are a result.
    [ -f "$run_dir/metrics.jsonl" ] || { echo "== shakespeare: no metrics.jsonl was written"; return 1; }
    cp "$run_dir/metrics.jsonl" "$LOG_DIR/"
    [ ! -f "$run_dir/loss.png" ] || cp "$run_dir/loss.png" "$LOG_DIR/"  # none where matplotlib is missing
    "$PYTHON" - "$run_dir/metrics.jsonl" <<'EOF' || status=$?
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
evals = [r for r in rows if "val_loss" in r]
if not evals:
    sys.exit("no validation loss logged yet")
best = min(evals, key=lambda r: r["val_loss"])
print(f"best validation loss {best['val_loss']:.4f} at step {best['step']}; last {evals[-1]['val_loss']:.4f} "
      f"at step {evals[-1]['step']} (nanoGPT: 1.4697; on an H100 best 1.4677 at step 1750, 129 s in all)")
EOF
    return "$status"
}

# Each part runs even when an earlier one failed (a borrowed machine's minutes are few); the exit status
# counts the parts that failed.
failed=0
part() { "$@" || failed=$((failed + 1)); }
for name in "${@:-all}"; do  # every name checked before anything runs
    case "$name" in
        cuda-tests | decode | int8 | train-gpt2 | train-tinyllama | train | shakespeare | loss | all) ;;
        *) echo "bench/gpu.sh: unknown part $name (cuda-tests decode int8 train-gpt2 train-tinyllama train" \
               "shakespeare loss all)" >&2
           exit 2 ;;
    esac
done
# The machine, and the one thing the engine needs that CPU runs never exercise: a non-blocking copy to
# pinned host memory (how the decode loop reads tokens back without synchronizing).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" -c "import torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())
x = torch.arange(4, device='cuda').to('cpu', non_blocking=True); torch.cuda.synchronize()
print('pinned non-blocking copy:', 'ok' if x.tolist() == [0, 1, 2, 3] and x.is_pinned() else 'NOT pinned')" || true
for name in "${@:-all}"; do
    case "$name" in
        cuda-tests) part cuda_tests ;;
        decode | int8) part decode ;;  # the int8 timings are part of decode
        train-gpt2) part train_gpt2 ;;
        train-tinyllama) part train_tinyllama ;;
        train) part train_gpt2; part train_tinyllama ;;
        shakespeare) part shakespeare ;;
        loss) part loss ;;
        all) part cuda_tests; part decode; part train_gpt2; part shakespeare; part train_tinyllama; part loss ;;
    esac
done
exit "$failed"
