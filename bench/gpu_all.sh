#!/usr/bin/env bash
# Every GPU benchmark figure in one command, on one H100/H200, in under 10 minutes.
#
#   bash bench/gpu_all.sh                       # JSON + log into $OUT if set, else bench/results/
#   BUDGET_S=500 bash bench/gpu_all.sh          # wall-clock budget for everything (default 540 s)
#   PHASES="b64 training" bash bench/gpu_all.sh # a subset of: b64 training t2i b64_autotune b16_b256
#   PY=/path/to/python bash bench/gpu_all.sh    # default: .venv/bin/python or python3, whichever has CUDA
#   EXTRA_ARGS="--backbone ckpt.pt" bash ...     # appended to every benchmark's options (last one wins);
#                                               # shared ones: --device --preset --batch-sizes --warmup
#                                               # --backend --backbone --source --sidenet
#
# Phases, most important first (each one is skipped when too little of the budget is left, and
# each benchmark rewrites its JSON after every measurement, so a cut-off run still leaves data):
#   b64           SiT-XL/2 + release SideNet, batch 64 with CFG: naive / eager / compiled /
#                 compiled-graphs (compile mode "default": quick to compile); components,
#                 BA-5/10 vs Euler-50/100, kernel profile                    -> sampling_b64.json
#   training      chain loss K = 8, batch 64: eager vs compiled, images/s, peak memory
#                                                                            -> training_gpu.json
#   t2i           SD3-medium and FLUX.1-dev at 1024x1024, random bf16 weights, batch 1 and 4:
#                 backbone call vs SideNet per BA step (overhead), BA-8 vs Euler-8/28 end to end,
#                 chain-loss training images/s and peak memory             -> t2i_gpu.json
#   b64_autotune  batch 64, compiled-graphs with the SideNet compiled in "max-autotune-no-cudagraphs"
#                 (the config default; autotuning takes minutes)             -> sampling_b64_autotune.json
#   b16_b256      batch 16 and 256: naive vs compiled-graphs                 -> sampling_b16_b256.json
# Only python, torch (CUDA) and the packages bafm.models / bafm.solvers import are needed
# (numpy, safetensors, torchdiffeq); nothing is installed or downloaded.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
BUDGET_S="${BUDGET_S:-540}"
PHASES="${PHASES:-b64 training t2i b64_autotune b16_b256}"
START=$(date +%s)
LOG="$OUT_DIR/gpu_all.log"
: > "$LOG"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

PY="${PY:-}"
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" > /dev/null 2>&1 && \
       "$candidate" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
      PY="$candidate"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_all: no Python with a CUDA-enabled torch found (set PY=...)" | tee -a "$LOG"
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# run NAME MIN_S SHARE_S CMD...: skipped when fewer than MIN_S seconds are left; the benchmark starts no
# new measurement after SHARE_S seconds (it may finish the one in progress) and is stopped when the
# whole budget ends.
run() {
  local name=$1 need=$2 share=$3 remaining status
  shift 3
  case " $PHASES " in *" $name "*) ;; *) return 0 ;; esac
  remaining=$(left)
  if [ "$remaining" -lt "$need" ]; then
    echo "== $name: skipped, $remaining s of the budget left" | tee -a "$LOG"
    return 0
  fi
  [ "$share" -gt $(( remaining - 20 )) ] && share=$(( remaining - 20 ))
  echo "== $name ($remaining s left, share $share s): $*" | tee -a "$LOG"
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of options
  timeout --signal=INT --kill-after=15 "$remaining" "$@" --budget-s "$share" ${EXTRA_ARGS:-} 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $(( $(date +%s) - START )) s in total" | tee -a "$LOG"
}

{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$OUT_DIR/gpu_env.txt" 2>&1 || true

run b64 150 200 "$PY" bench/bench_sampling.py --batch-sizes 64 --profile --side-mode default \
  --out "$OUT_DIR/sampling_b64.json"
run training 90 100 "$PY" bench/bench_training.py --batch-sizes 64 --links 8 --side-mode default \
  --out "$OUT_DIR/training_gpu.json"
run t2i 120 200 "$PY" bench/bench_t2i.py --batch-sizes 1 4 --nfes 8 --out "$OUT_DIR/t2i_gpu.json"
run b64_autotune 120 150 "$PY" bench/bench_sampling.py --batch-sizes 64 --variants compiled-graphs \
  --side-mode max-autotune-no-cudagraphs --profile --out "$OUT_DIR/sampling_b64_autotune.json"
run b16_b256 90 600 "$PY" bench/bench_sampling.py --batch-sizes 16 256 --variants naive compiled-graphs \
  --side-mode default --out "$OUT_DIR/sampling_b16_b256.json"

echo "== done after $(( $(date +%s) - START )) s; results in $OUT_DIR" | tee -a "$LOG"
for f in "$OUT_DIR"/*.json; do
  [ -e "$f" ] && "$PY" - "$f" << 'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: {d['benchmark']} on {d['meta'].get('device')}: {d['status']}, {len(d['errors'])} errors")
if d["benchmark"] == "t2i":
    for size, rows in d["results"].items():
        for batch, r in (rows.items() if isinstance(rows, dict) else []):
            if not isinstance(r, dict) or "components" not in r:
                continue
            comp, e2e, tr = r["components"], r.get("end_to_end", {}), r.get("training", {})
            print(f"  {size} {batch} backbone {comp['backbone_call']['median_ms']:8.1f} ms  side/step "
                  f"{comp['sidenet_per_step']['median_ms']:7.1f} ms  overhead {100 * comp['overhead_ratio']:5.1f} %  "
                  + "  ".join(f"{k} {v['median_s']:.2f} s" for k, v in e2e.items())
                  + (f"  train {tr['images_per_s']:.2f} img/s peak {tr['peak_memory_gib']} GiB" if tr else ""))
    for e in d["errors"]:
        print("  error:", e)
    sys.exit(0)
for batch, variants in d["results"].items():
    for name, r in variants.items():
        comp, e2e = r.get("components", {}), r.get("end_to_end", {})
        if comp:
            print(f"  {batch} {name:16s} backbone {comp['backbone']['median_ms']:8.2f} ms  side/step "
                  f"{comp['sidenet_per_step_ms']:7.2f} ms  overhead {100 * comp['overhead_ratio']:5.1f} %  "
                  f"euler100/ba10 {e2e.get('speedup_euler-100_over_ba-10')}")
        elif "images_per_s" in r:
            print(f"  {batch} {name:10s} {r['images_per_s']:8.1f} images/s  peak {r['peak_memory_gib']} GiB")
for e in d["errors"]:
    print("  error:", e)
EOF
done
