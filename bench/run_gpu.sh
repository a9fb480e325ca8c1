#!/usr/bin/env bash
# One command for a lent GPU (e.g. the device tool, where the repo runs with PYTHONPATH=. and no installs):
#   bash bench/run_gpu.sh tests              # GPU correctness: the whole test suite, real-size bf16/fp16 included
#   bash bench/run_gpu.sh bench [-k EXPR]    # benchmarks -> <gpu>-<date>.json + .md (a -k subset fits a 10-minute call)
# Results go to $OUT when set (the device tool brings that folder back), else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print(next((k.lower() for k in ('H200', 'H100', 'A100') if k in n), n.split()[-1].lower()))")
name="$gpu-$(date -u +%F)"
what=${1:-tests}
shift || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$out/$name-versions.txt"
case "$what" in
  tests) python3 -m pytest tests -q -p no:cacheprovider -rs "$@" 2>&1 | tee "$out/$name-tests.log" ;;
  bench) python3 -m pytest bench --benchmark-only -q -p no:cacheprovider --benchmark-json "$out/$name.json" "$@" 2>&1 | tee "$out/$name-bench.log"
         python3 -m bench.report "$out/$name.json" > "$out/$name.md" && cat "$out/$name.md" ;;
  *) echo "usage: bash bench/run_gpu.sh tests|bench [pytest args]" >&2; exit 2 ;;
esac
