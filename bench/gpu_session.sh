#!/usr/bin/env bash
# The one prepared command for a lent GPU (the device tool runs it in the repo root, on the machine's own python3:
# torch, triton, transformers there; nothing installed, nothing carried). Every phase writes its results under
# $OUT as it goes and has its own time limit, so whatever the lease allows comes back:
#   1. the GPU-marked tests (pytest -m gpu: real sizes, bf16/fp16, the 124M model)          <= 120 s
#   2. the benchmark groups, most important first, one JSON each, then report.py's table    <= 240 s
#   3. 30 fine-tuning steps of a random GPT-2 124M (GPT-2's layout), --backend triton and
#      --backend torch on the same batches: tokens/s and peak memory from their summaries    <= 2 x 50 s
# About 7.5 minutes in all. Rehearse on a CPU with REHEARSAL=1 (tiny sizes, every phase exercised).
#   OUT=/tmp/out bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/session}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
rehearsal=${REHEARSAL:-0}
# a "-k" expression is split at " -k " below: each group is "FILE -k EXPRESSION"
log() { echo "[$(date -u +%T)] $*" | tee -a "$out/session.log"; }

python3 - <<'EOF' 2>&1 | tee "$out/versions.txt"
import subprocess, torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (rehearsal)"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; commit {commit or 'unknown'}")
EOF

log "1. GPU tests"
timeout 120 python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs > "$out/tests.log" 2>&1
log "   exit $? ($(tail -n 1 "$out/tests.log"))"

log "2. benchmarks"
groups=("bench_attention.py -k 64-True" "bench_model.py -k train_step and not partial and not largest"
        "bench_norms_ce.py -k add_layer_norm or linear_cross_entropy" "bench_norms_ce.py -k cross_entropy and not linear"
        "bench_norms_ce.py -k bench_norm" "bench_model.py -k largest" "bench_hf.py -k gpt2" "bench_attention.py -k not 64-True"
        "bench_model.py -k generate or partial" "bench_hf.py -k not gpt2")
deadline=$((SECONDS + 240))
for i in "${!groups[@]}"; do
  left=$((deadline - SECONDS))
  if [ "$left" -le 10 ]; then log "   out of time before group $i: ${groups[$i]}"; break; fi
  file=${groups[$i]%% *}; expr=${groups[$i]#* -k }
  timeout "$left" python3 -m pytest "bench/$file" -k "$expr" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json "$out/bench-$i.json" > "$out/bench-$i.log" 2>&1
  log "   group $i (${groups[$i]}): exit $?"
done
python3 -m bench.report "$out"/bench-*.json > "$out/report.md" 2> "$out/report.err" && log "   report.md written"

log "3. fine-tuning, 30 steps of GPT-2 124M"
if [ "$rehearsal" = 1 ]; then preset="dict(n_layer=2, n_head=2, n_embd=64)"; steps=2; batch=2; seq=64; device=cpu
  export TRITON_INTERPRET=1  # the triton backend on the CPU
else preset="GPTConfig.PRESETS['gpt2']"; steps=30; batch=8; seq=1024; device=cuda; fi
python3 -c "import torch; from fastlm import GPT, GPTConfig; torch.manual_seed(0); GPT(GPTConfig(**$preset)).save_pretrained('$out/gpt2-random')"
for backend in triton torch; do
  timeout 50 python3 -m fastlm.finetune --weights "$out/gpt2-random" --backend "$backend" --device "$device" \
      --max-steps "$steps" --batch-size "$batch" --seq-len "$seq" --log-every 10 --eval-every "$steps" \
      --save-every "$steps" --sample-tokens 0 --out "$out/finetune-$backend" --overwrite > "$out/finetune-$backend.log" 2>&1
  log "   $backend: exit $? ($(grep -h '^done' "$out/finetune-$backend.log" | head -n 1))"
done
rm -rf "$out/gpt2-random" "$out"/finetune-*/checkpoint.pt "$out"/finetune-*/model.safetensors  # keep logs and metrics only
log "done"
