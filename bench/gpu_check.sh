#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called indirectly, through run_step
# The GPU check (issue 21, point 6): one run on a lent GPU machine, about 10 minutes, every step logged.
#
#   bash bench/gpu_check.sh                        # GPU machine with PyPI: venv with the [gpu] extra, then the checks
#   bash bench/gpu_check.sh --wheelhouse DIR       # GPU machine without PyPI: install from wheels carried in DIR
#   bash bench/gpu_check.sh --dry-run              # any CPU machine: every step at tiny sizes on CPU (gloo), no
#                                                  # venv (its pip commands are printed), so the script is exercised
#
# Results in OUT: summary.md (for docs/RESULTS.md), summary.tsv (step, status, seconds, note), quantize.json,
# ranker.json, align.json (the benches' JSON), and logs/ (NN-step.log per step and the benches' tables).
# Steps:
#   1 env         nvidia-smi, the GPUs torch sees
#   2 venv        python -m venv; requirements.txt without the CPU builds (fbgemm-gpu-cpu, faiss-cpu), the dev
#                 requirements, the project with the [gpu] extra (fbgemm-gpu, faiss-gpu), torchrec --no-deps; then
#                 checks the CPU builds are absent and torch / faiss / fbgemm see the GPU
#   3 gpu-tests   pytest -m "gpu and not slow": the tests that skip without a GPU (GPU GEMM search, GPU encode,
#                 faiss GPU k-means); -rs lists any that still skipped, and a skip fails the step on a GPU machine
#   4 align-nccl  the data-parallel alignment trainer, 2 ranks over nccl against 1 rank on one GPU (pytest, slow
#                 test; needs 2 GPUs: nccl refuses two ranks on one device)
#   5 ranker      the ranker on CUDA with row-wise sharding: the 2-rank nccl DMP test (2 GPUs) and bench/ranker.py
#                 --sharding row_wise (DMP on CUDA with 1 rank, and 2 where there are 2 GPUs)
#   6 quantize    bench/quantize.py --device cuda: our RQ-Kmeans on the GPU vs faiss.ResidualQuantizer (CPU,
#                 every core), the GEMM bound measured on the GPU
#   7 align-bench bench/align.py --device cuda: full / adapters / side alignment on the GPU
# Each step's timeout is the smaller of its own and what is left of --budget (default 600 s); a step that fails
# does not stop the others. Exit status 0 when no step failed (skips are listed with their reason).
#
# Options (environment variables of the same name in capitals also work: OUT, QARM_PYTHON, ...):
#   --out DIR                 results folder (default: $OUT when set, else ./gpu-check-out)
#   --venv DIR                virtual environment to create (default: .venv-gpu)
#   --python PY               interpreter that creates the venv (default: python3), or the one used as is with
#                             --no-venv / --dry-run (default there: .venv/bin/python, else python3)
#   --wheelhouse DIR          pip installs with --no-index --find-links DIR (a machine that cannot reach PyPI)
#   --system-site-packages    the venv also sees the interpreter's packages (an image that has CUDA torch)
#   --no-venv                 use --python as it is (already has the [gpu] extra)
#   --budget SECONDS          total time (default 600)
#   --pack                    leave six files in OUT: logs/ goes into logs.tar.gz (a folder that must stay small)
#   --dry-run                 see above
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/gpu-check-out}"
VENV="${QARM_GPU_VENV:-$REPO/.venv-gpu}"
PYTHON="${QARM_PYTHON:-}"
WHEELHOUSE="${QARM_WHEELHOUSE:-}"
SYSTEM_SITE=0
NO_VENV=0
DRY_RUN=0
PACK=0
BUDGET=600

usage() { sed -n "3,/^set -uo/p" "${BASH_SOURCE[0]}" | sed "\$d; s/^# \\{0,1\\}//"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --system-site-packages) SYSTEM_SITE=1; shift ;;
    --no-venv) NO_VENV=1; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --pack) PACK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
if [ -n "$WHEELHOUSE" ] && [ ! -d "$WHEELHOUSE" ]; then
  echo "gpu_check: --wheelhouse $WHEELHOUSE is not a folder" >&2; exit 2
fi

LOGS="$OUT_DIR/logs"
mkdir -p "$LOGS"
SUMMARY="$OUT_DIR/summary.tsv"
printf 'step\tstatus\tseconds\tnote\n' > "$SUMMARY"
STEP_NO=0
FAILED=0
START=$SECONDS
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

# every core the machine has (nproc alone answers OMP_NUM_THREADS when that is set)
cores() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

say() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }

# record STEP STATUS SECONDS NOTE: one summary row (STATUS: ok, failed, skipped)
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  [ "$2" = failed ] && FAILED=1
  say "$1: $2 (${3}s)${4:+ - $4}"
}

# run_step NAME SECONDS FUNCTION: runs FUNCTION with its output in OUT/logs/NN-NAME.log under a timeout of
# min(SECONDS, budget left); FUNCTION sets NOTE and returns 0 (ok), 1 (failed) or 3 (skipped, NOTE says why).
run_step() {
  local name="$1" limit="$2" fn="$3" left rc t0 log
  STEP_NO=$((STEP_NO + 1))
  log="$LOGS/$(printf '%02d' "$STEP_NO")-$name.log"
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    record "$name" skipped 0 "budget of ${BUDGET}s spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  STEP_TIMEOUT=$limit
  NOTE=""
  say "$name: starting (timeout ${limit}s, log $log)"
  t0=$SECONDS
  "$fn" > "$log" 2>&1
  rc=$?
  case "$rc" in
    0) record "$name" ok $((SECONDS - t0)) "$NOTE" ;;
    3) record "$name" skipped $((SECONDS - t0)) "$NOTE" ;;
    124|137) record "$name" failed $((SECONDS - t0)) "timed out after ${limit}s${NOTE:+; $NOTE}" ;;
    *) record "$name" failed $((SECONDS - t0)) "exit $rc${NOTE:+; $NOTE}; see $log" ;;
  esac
}

# limited CMD...: CMD under the current step's timeout (SIGTERM, then SIGKILL 10 s later)
limited() { timeout --kill-after=10 "$STEP_TIMEOUT" "$@"; }

# show CMD...: the command as it runs (dry run: only printed)
show() {
  echo "+ $*"
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  limited "$@"
}

pip_args() {
  if [ -n "$WHEELHOUSE" ]; then echo "--no-index --find-links $WHEELHOUSE"; fi
}

# ---- 1 env -------------------------------------------------------------------------------------------------
step_env() {
  uname -a
  cores
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else
    echo "nvidia-smi: not found"
    [ "$DRY_RUN" = 1 ] || { NOTE="no nvidia-smi: not a GPU machine"; return 1; }
  fi
  NOTE="$(cores) cores"
}

# ---- 2 venv ------------------------------------------------------------------------------------------------
GPU_REQUIREMENTS="$LOGS/requirements-gpu.txt"

step_venv() {
  # the CPU builds must never sit beside the CUDA ones (the Makefile's rule, the other way round)
  grep -v -E '^(fbgemm-gpu-cpu|faiss-cpu)([=<>!~ ;]|$)' requirements.txt > "$GPU_REQUIREMENTS"
  if grep -q -E '^(fbgemm-gpu-cpu|faiss-cpu)' "$GPU_REQUIREMENTS"; then
    NOTE="could not drop the CPU builds from requirements.txt"; return 1
  fi
  echo "requirements without the CPU builds: $GPU_REQUIREMENTS"
  local base="${PYTHON:-python3}" vpy="$VENV/bin/python" site=()
  [ "$SYSTEM_SITE" = 1 ] && site=(--system-site-packages)
  # shellcheck disable=SC2046  # pip_args is meant to split into words
  {
    show "$base" -m venv "${site[@]}" "$VENV" &&
    { show "$vpy" -m pip install -q $(pip_args) --upgrade pip setuptools wheel || echo "(pip upgrade failed: kept)"; } &&
    show "$vpy" -m pip install -q $(pip_args) -r "$GPU_REQUIREMENTS" -r requirements-dev.txt &&
    show "$vpy" -m pip install -q $(pip_args) --no-build-isolation -e ".[gpu]" &&
    show "$vpy" -m pip install -q $(pip_args) --no-deps torchrec==1.9.2
  } || { NOTE="pip failed"; return 1; }
  if [ "$DRY_RUN" = 1 ]; then
    NOTE="dry run: venv commands printed, not run"
    return 3
  fi
  PY="$vpy"
  if "$PY" -m pip show fbgemm-gpu-cpu > /dev/null 2>&1 || "$PY" -m pip show faiss-cpu > /dev/null 2>&1; then
    NOTE="a CPU build (fbgemm-gpu-cpu / faiss-cpu) landed beside the CUDA one"; return 1
  fi
  check_gpu_stack
}

check_gpu_stack() {
  limited "$PY" - <<'EOF'
import faiss, fbgemm_gpu, torch, torchrec  # noqa: F401 (imports are the check)
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus())
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
assert faiss.get_num_gpus() > 0, "faiss sees no GPU (faiss-cpu installed instead of faiss-gpu?)"
EOF
  local rc=$?
  [ "$rc" = 0 ] || NOTE="the GPU stack does not see the GPU"
  return "$rc"
}

# ---- 3 gpu tests -------------------------------------------------------------------------------------------
step_gpu_tests() {
  limited "$PY" -m pytest -q -p no:xdist -p no:cacheprovider -rs -m "gpu and not slow" tests \
    2>&1 | tee "$LOGS/gpu-tests.txt"
  local rc=${PIPESTATUS[0]}
  local skipped
  skipped=$(grep -c '^SKIPPED' "$LOGS/gpu-tests.txt")
  NOTE="$(grep -E '[0-9]+ (passed|failed|skipped|deselected)' "$LOGS/gpu-tests.txt" | tail -1)"
  [ "$rc" = 0 ] || return 1
  if [ "$skipped" -gt 0 ] && [ "$DRY_RUN" = 0 ]; then
    NOTE="$NOTE; a GPU test skipped on the GPU machine"; return 1
  fi
  [ "$DRY_RUN" = 1 ] && NOTE="dry run (CPU): $NOTE"
  return 0
}

# a slow GPU test that needs N GPUs: run it where there are N, else say why not (a dry run runs the CPU
# counterpart named in $3 instead, so the same code path is exercised with gloo)
two_gpu_test() {
  local node="$1" what="$2" cpu_node="$3"
  if [ "$NGPU" -ge 2 ]; then
    limited "$PY" -m pytest -q -p no:xdist -p no:cacheprovider -rs "$node"
    return $?
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: $what on CPU (gloo) instead: $cpu_node"
    limited "$PY" -m pytest -q -p no:xdist -p no:cacheprovider -rs "$cpu_node" || return 1
    NOTE="dry run: CPU counterpart passed"
    return 3
  fi
  NOTE="$what needs 2 GPUs (nccl runs one rank per GPU); this machine has $NGPU"
  return 3
}

# ---- 4 align nccl ------------------------------------------------------------------------------------------
step_align_nccl() {
  two_gpu_test tests/encoder/test_shard_trainer.py::test_two_nccl_processes_match_one_gpu_process \
    "2-rank nccl alignment" \
    tests/encoder/test_shard_trainer.py::test_two_gloo_processes_match_one_process_with_the_same_global_batch
}

# ---- 5 ranker ----------------------------------------------------------------------------------------------
step_ranker() {
  local test_rc=0 note_test
  two_gpu_test tests/ranker/test_distributed.py::test_two_process_dmp_training_on_cuda_row_wise \
    "2-rank nccl ranker (row_wise)" "tests/ranker/test_distributed.py::test_two_process_dmp_training[table_wise]"
  test_rc=$?
  note_test="$NOTE"
  local sizes=()
  [ "$DRY_RUN" = 1 ] && sizes=(--steps 3 --warmup 1 --batch-size 128 --items 500 --users 100 --events 3000)
  limited "$PY" bench/ranker.py --sharding row_wise --skip-single --threads 2 "${sizes[@]}" --json | tee "$LOGS/ranker.txt"
  local rc=${PIPESTATUS[0]}
  tail -1 "$LOGS/ranker.txt" > "$OUT_DIR/ranker.json"
  NOTE="${note_test:+$note_test; }bench/ranker.py row_wise: $(grep -E '^dmp-' "$LOGS/ranker.txt" | tr -s ' ' | paste -sd ';' -)"
  if [ "$rc" != 0 ] || grep -q 'failed' "$LOGS/ranker.txt"; then return 1; fi
  [ "$test_rc" = 1 ] && return 1
  return 0
}

# ---- 6 quantize --------------------------------------------------------------------------------------------
step_quantize() {
  local args=(--sizes 1000000x64 --configs 3x1024 --threads "$(cores)" --device cuda --skip-movielens)
  [ "$DRY_RUN" = 1 ] && args=(--sizes 20000x32 --configs 2x64 --sample 20000 --threads 1 --device cpu
                              --skip-movielens --encode-repeats 1)
  limited "$PY" bench/quantize.py "${args[@]}" --json | tee "$LOGS/quantize.txt"
  local rc=${PIPESTATUS[0]}
  tail -1 "$LOGS/quantize.txt" > "$OUT_DIR/quantize.json"
  [ "$rc" = 0 ] || return 1
  NOTE=$("$PY" - "$OUT_DIR/quantize.json" <<'EOF'
import json, sys
for case in json.load(open(sys.argv[1]))["cases"]:
    ours = case["ours"]
    line = (f"{case['n']}x{case['d']} {case['levels']}x{case['codebook_size']}: ours {ours['total_s']:.2f}s "
            f"rel_mse {ours['rel_mse']:.4f}, encode {ours['encode_vs_gemm_bound']:.2f}x the GEMM bound")
    for variant, theirs in case.get("faiss", {}).items():
        line += f"; faiss {variant} {theirs['total_s']:.2f}s ({theirs['speedup_total']:.2f}x) rel_mse {theirs['rel_mse']:.4f}"
    print(line)
EOF
)
  return 0
}

# ---- 7 align bench -----------------------------------------------------------------------------------------
step_align_bench() {
  local args=(--device cuda --threads 4)
  [ "$DRY_RUN" = 1 ] && args=(--device cpu --threads 1 --modes side --steps 2 --n-items 60 --n-users 60
                              --n-events 1500 --encoder tiny)
  limited "$PY" bench/align.py "${args[@]}" --json | tee "$LOGS/align.txt"
  local rc=${PIPESTATUS[0]}
  tail -1 "$LOGS/align.txt" > "$OUT_DIR/align.json"
  [ "$rc" = 0 ] || return 1
  NOTE=$("$PY" - "$OUT_DIR/align.json" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
print(f"{result['device']}: " + "; ".join(
    f"{mode} {row['seconds_per_epoch']:.2f} s/epoch, peak {row['peak_rss_mb']:.0f} MB, R@10 {row['next_item_recall@10']:.3f}"
    for mode, row in result["modes"].items()))
EOF
)
  return 0
}

# ---- run -----------------------------------------------------------------------------------------------------
if [ "$NO_VENV" = 1 ] || [ "$DRY_RUN" = 1 ]; then
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
  fi
else
  PY="$VENV/bin/python"
fi
say "repo $REPO, out $OUT_DIR, budget ${BUDGET}s$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN on CPU')"

run_step env 20 step_env
if [ "$NO_VENV" = 1 ]; then
  run_step gpu-stack 60 check_gpu_stack
else
  run_step venv 220 step_venv
fi
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
say "python $PY sees $NGPU GPU(s)"
if [ "$DRY_RUN" = 0 ] && [ "$NGPU" = 0 ]; then
  record gpu failed 0 "torch sees no GPU: the remaining steps need one (use --dry-run on a CPU machine)"
else
  run_step gpu-tests 60 step_gpu_tests
  run_step align-nccl 90 step_align_nccl
  run_step ranker 90 step_ranker
  run_step quantize 120 step_quantize
  run_step align-bench 120 step_align_bench
fi

{
  echo "## GPU check ($(date -u +%Y-%m-%d), $([ "$DRY_RUN" = 1 ] && echo 'dry run on CPU' || echo "$NGPU GPU(s)"))"
  echo
  echo "Command: \`bash bench/gpu_check.sh $([ "$DRY_RUN" = 1 ] && echo '--dry-run')\`, $((SECONDS - START)) s in all."
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/GPU: /'
  echo
  echo "| step | status | seconds | note |"
  echo "| --- | --- | ---: | --- |"
  tail -n +2 "$SUMMARY" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
  if [ -s "$LOGS/quantize.txt" ]; then
    echo; echo '```'; sed -n '/^thr /,/^peak RSS/p' "$LOGS/quantize.txt"; echo '```'
  fi
} > "$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
if [ "$PACK" = 1 ]; then
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" logs && rm -rf "$LOGS"
fi
say "done in $((SECONDS - START))s: $([ "$FAILED" = 0 ] && echo 'no step failed' || echo 'SOME STEP FAILED')"
exit "$FAILED"
