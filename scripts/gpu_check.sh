#!/usr/bin/env bash
# One prepared check on a CUDA machine (issue 11): the engine and trainer tests with their models
# on the GPU (SEEKLING_TEST_DEVICE=cuda, read by the `device` fixture in tests/conftest.py), then
# the training and decode benchmarks in bf16, a single-GPU bf16 training run of the gpu_1b preset
# (scripts/train_step_check.py: tokens/s, MFU, peak memory), and one table of it all. About 10 minutes on an
# H200: each part has its own time limit (below) and a part that overruns is cut and reported.
#
#   scripts/gpu_check.sh                  # the table goes to stdout and, with logs, to $OUT (else a temp dir)
#   PYTHON=/path/to/python scripts/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu T_TRAIN=30 scripts/gpu_check.sh   # a dry run of this script on a CPU (not a GPU check)
#
# Needs a CUDA build of torch with pytest, hypothesis and transformers beside it; no network (the
# benchmarks use random weights, the tests the embedded corpus). Runs from the checkout itself
# (PYTHONPATH), so seekling need not be installed. Exits non-zero without a GPU, or if any part fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV=${GPU_CHECK_DEVICE:-cuda}

# Seconds per part; together they keep the run near 10 minutes.
T_ENGINE=${T_ENGINE:-180}
T_TRAIN=${T_TRAIN:-120}
T_BENCH_TRAIN=${T_BENCH_TRAIN:-90}
T_BENCH_DECODE=${T_BENCH_DECODE:-200}  # each cell is a fresh process that compiles (from Inductor's cache after the first)
T_TRAIN_1B=${T_TRAIN_1B:-150}  # gpu_1b at 8x2048 tokens per step: model build, 2 warm-up and 6 timed steps
TRAIN_1B_ARGS=${TRAIN_1B_ARGS:-"--preset gpu_1b --batch 8 --seq 2048 --steps 6"}

ENGINE_TESTS=${ENGINE_TESTS:-"tests/test_engine_device.py tests/test_engine.py tests/test_engine_compiled.py tests/test_spec.py tests/test_sampling.py"}
TRAIN_TESTS=${TRAIN_TESTS:-"tests/test_train.py tests/test_train_core.py tests/test_resume.py"}

# A Python whose torch sees a GPU: $PYTHON, else the project's venv, else the system's.
PY=${PYTHON:-}
has_gpu() { [ "$DEV" = cpu ] || "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
if [ -z "$PY" ]; then
    for cand in "$ROOT/.venv/bin/python" python3; do
        if command -v "$cand" >/dev/null 2>&1 && has_gpu "$cand"; then
            PY=$cand
            break
        fi
    done
fi
if [ -z "$PY" ] || ! has_gpu "$PY"; then
    echo "gpu_check: no CUDA GPU here: torch.cuda.is_available() is False for ${PY:-.venv/bin/python and python3}" >&2
    echo "gpu_check: run this on a machine with an NVIDIA GPU and a CUDA build of torch (or set PYTHON=...)." >&2
    exit 2
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["pytest", "hypothesis", "transformers", "safetensors", "tokenizers", "numpy", "tqdm", "rich", "matplotlib"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks: $missing; install them (or carry wheels) and run again" >&2
    exit 3
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset CI
OUT_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
STEPS=$(mktemp)  # name, exit status, seconds: one line per part (kept out of $OUT, which takes few files)

part() {  # part NAME SECONDS COMMAND...: run, log to $OUT_DIR/NAME.log, record status and time
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
    tail -n 3 "$OUT_DIR/$name.log"
}

existing() {  # the given test files that exist (another engineer may not have added one yet)
    local f
    for f in "$@"; do [ -f "$f" ] && printf '%s ' "$f"; done
}

# shellcheck disable=SC2086  # word splitting of the file lists is intended
part engine_tests "$T_ENGINE" env SEEKLING_TEST_DEVICE="$DEV" "$PY" -m pytest -q -p no:cacheprovider $ENGINE_TESTS
# shellcheck disable=SC2086
train_files=$(existing $TRAIN_TESTS)
if [ -n "$train_files" ]; then  # an empty list would make pytest run the whole suite
    # shellcheck disable=SC2086
    part train_tests "$T_TRAIN" env SEEKLING_TEST_DEVICE="$DEV" "$PY" -m pytest -q -p no:cacheprovider $train_files
else
    printf 'train_tests\tabsent\t0\n' >>"$STEPS"
fi
part bench_train "$T_BENCH_TRAIN" "$PY" bench/bench_train.py --device "$DEV" --dtype bfloat16 --preset small
part bench_decode "$T_BENCH_DECODE" "$PY" bench/bench_decode.py --device "$DEV" --dtype bfloat16 --batches 1,32 \
    --contexts 512 --new-tokens 32 --spec 1 --json "$OUT_DIR/bench_decode.json"

# shellcheck disable=SC2086  # word splitting of the arguments is intended
part train_1b "$T_TRAIN_1B" "$PY" scripts/train_step_check.py --device "$DEV" --dtype bfloat16 $TRAIN_1B_ARGS \
    --json "$OUT_DIR/train_1b.json"

"$PY" - "$STEPS" "$OUT_DIR" "$TRAIN_TESTS" <<'EOF'
"""Everything above in one markdown table, printed and written to gpu_check.md."""
import json
import os
import re
import sys

import torch

steps_file, out_dir, train_tests = sys.argv[1:4]
steps = [line.rstrip("\n").split("\t") for line in open(steps_file)]
status = {name: (int(rc) if rc.lstrip("-").isdigit() else rc, int(s)) for name, rc, s in steps}


def log(name):
    path = os.path.join(out_dir, f"{name}.log")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def verdict(name):
    rc, s = status[name]
    if rc == "absent":
        return "not run", s
    return ("ok" if rc == 0 else f"timed out after {s} s" if rc in (124, 137) else f"failed (exit {rc})"), s


gpu = torch.cuda.is_available()
rows = [("machine", torch.cuda.get_device_name() if gpu else "no GPU: a dry run on the CPU",
         f"torch {torch.__version__}, CUDA {torch.version.cuda}")]
where = "cuda" if gpu else "the CPU"
for name, label in (("engine_tests", f"engine tests on {where}"), ("train_tests", f"trainer tests on {where}")):
    v, s = verdict(name)
    counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped)(?:, \d+ \w+)*) in [\d.]+s", log(name), re.M)
    detail = f"{counts[-1] if counts else 'no pytest summary'}; {s} s"
    if name == "train_tests":
        absent = [f for f in train_tests.split() if not os.path.exists(f)]
        detail = f"not present: {' '.join(absent)}" if status[name][0] == "absent" else (
            detail + (f"; not present: {' '.join(absent)}" if absent else ""))
    rows.append((label, v, detail))

v, s = verdict("bench_train")
text = log("bench_train")
header = next((line for line in text.splitlines() if line.startswith("|") and "tokens/s" in line), None)
if header:
    cols = [c.strip() for c in header.strip("|").split("|")]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("|") or line == header or set("".join(cells)) <= set("-:") or len(cells) != len(cols):
            continue
        cell = dict(zip(cols, cells))
        name = " ".join(cell.get(k, "") for k in ("contestant", "dtype")).strip() or cells[0]
        rows.append((f"bench_train small: {name}", f"{cell.get('tokens/s', '?')} tok/s",
                     f"MFU {cell.get('MFU', '?')}, {cell.get('vs transformers', '?')} vs transformers"))
rows.append(("bench_train", v, f"{s} s" + ("" if header else "; no table in its output, see bench_train.log")))

v, s = verdict("bench_decode")
path = os.path.join(out_dir, "bench_decode.json")
report = json.load(open(path)) if os.path.exists(path) else {"cells": [], "speculative": []}
fmt = lambda r: f"{r['tok_s']:.0f} tok/s ({r['ms_step']:.2f} ms/step)" if r else "failed"
for c in report["cells"]:
    o, t = c["seekling"], c["transformers"]
    ratio = f", {o['tok_s'] / t['tok_s']:.2f}x" if o and t else ""
    rows.append((f"bench_decode bf16 batch {c['batch']} ctx {c['context']}", f"seekling {fmt(o)}",
                 f"transformers {fmt(t)}{ratio}"))
for c in report["speculative"]:
    p, q = c["plain"], c["speculative"]
    acc = f", acceptance {q['acceptance']:.0%}" if q else ""
    rows.append((f"bench_decode MTP k={c['draft_tokens']} batch {c['batch']}", f"speculative {fmt(q)}",
                 f"plain eager {fmt(p)}, compiled {fmt(c['compiled_plain'])}{acc}"))
rows.append(("bench_decode", v, f"{s} s"))

v, s = verdict("train_1b")
path = os.path.join(out_dir, "train_1b.json")
if os.path.exists(path):
    r = json.load(open(path))
    spec = f", {r['mfu_vs_spec']:.1%} of the data-sheet bf16 peak" if "mfu_vs_spec" in r else ""
    rows.append((f"train {r['preset']} bf16, one device, {r['micro_batch'][0]}x{r['micro_batch'][1]} tokens/step",
                 f"{r['tok_s']:,.0f} tok/s", f"MFU {r['mfu']:.1%} of the measured {r['peak_tflops']} TFLOP/s{spec}; "
                 f"peak memory {r['peak_mem_gib']} GiB; {r['ms_per_step']} ms/step"))
rows.append(("train_1b", v, f"{s} s"))

table = ["| check | result | detail |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
print("\n" + "\n".join(table))
with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
    f.write("\n".join(table) + "\n")
print(f"\nlogs and table: {out_dir}")
sys.exit(0 if all(rc in (0, "absent") for rc, _ in status.values()) else 1)
EOF
rc=$?
rm -f "$STEPS"
exit $rc
