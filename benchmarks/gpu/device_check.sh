#!/usr/bin/env bash
# Prepared GPU check, for a machine with an NVIDIA GPU. Budget: it
# stops itself well inside 8 minutes (every step has its own time limit).
#
#   1. install the carried wheels (mergekit, its missing dependencies, the plugin)
#   2. the test suite, with CUDA available
#   3. CPU == CUDA: the kernel's bytes on many inputs (CPU: the fused numba kernel
#      and the torch kernel; CUDA: the torch kernel; all three the same bytes, and
#      the same stats), and the digest of a real mergekit-yaml circuit merge run on
#      CPU (the fused kernel) and with --cuda (same recipe, seed)
#   4. the contribution report's cost with --cuda (35M, 1 round; target: under 5%)
#   5. circuit vs della with --cuda on a generated ~1B-parameter model (bf16)
#
# Prepare here (network):  bash benchmarks/gpu/device_wheels.sh      -> .whl/
# Run there (device tool): command "bash benchmarks/gpu/device_check.sh", carry [".whl"],
#                          timeout_s 540. Results land in $OUT (device_check.log,
#                          device-1B.md/.json/.png); commit them under
#                          benchmarks/speed/results/ afterwards.
# Dry run without a GPU:   DEVICE_CHECK_DRY=1 PYTHON=.venv/bin/python \
#                          DEVICE_CHECK_SKIP_TESTS=1 bash benchmarks/gpu/device_check.sh
#                          (CPU sides only, small models, no pip install)
set -uo pipefail
cd "$(dirname "$0")/../.."   # the repository root
START=$SECONDS
BUDGET=${DEVICE_CHECK_BUDGET:-470}      # seconds for the whole script (< 8 min)
OUT_DIR="${OUT:-/tmp/device-check-out}"
CACHE="${DEVICE_CHECK_CACHE:-/tmp/circuit-bench-cache}"
DRY="${DEVICE_CHECK_DRY:-0}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR" "$CACHE"
exec > >(tee "$OUT_DIR/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
FAILED=()
left() { echo $(( BUDGET - (SECONDS - START) )); }
step() { echo; echo "=== [$((SECONDS - START))s] $*"; }

step "setup"
if [ "$DRY" != 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        # into the image's own environment: the plugin's start-up hook is a .pth
        # file, which Python reads from site-packages (not from PYTHONPATH)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check .whl/*.whl || FAILED+=("pip-install")
    else
        echo "no .whl/ carried: run benchmarks/gpu/device_wheels.sh here first"
        FAILED+=("no-wheels")
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import torch, importlib.metadata as m
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("mergekit", "circuit-merge-plugin", "transformers", "pydantic", "numba", "llvmlite"):
    try:
        print(name, m.version(name))
    except Exception as error:
        print(name, "MISSING", error)
PYEOF
"$PY" -c "from mergekit.merge_methods.registry import get; get('circuit'); print('merge_method circuit is registered')" \
    || FAILED+=("registration")
"$PY" -c "from circuit_merge_plugin.core.kernel import kernel_implementation as k; print('kernel on cpu:', k('cpu'), '/ on cuda:', k('cuda')); assert k('cpu') == 'fused'" \
    || FAILED+=("fused-kernel")

# leaves >= 280 s for the digest check (<= 100 s), the report cost (<= 90 s, when
# there is time) and the 1B timing (~160 s)
TEST_LIMIT=$(( $(left) > 430 ? 150 : $(left) / 3 ))
step "test suite (limit ${TEST_LIMIT}s)"
if [ "${DEVICE_CHECK_SKIP_TESTS:-0}" = 1 ]; then
    echo "skipped (DEVICE_CHECK_SKIP_TESTS=1)"
else
    XDIST=()
    # 16 cores there: spread the suite (its mergekit-yaml subprocesses dominate)
    if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
    timeout "$TEST_LIMIT" "$PY" -m pytest -q -x -p no:cacheprovider "${XDIST[@]}" tests/ 2>&1 | tail -25
    TEST_RC=${PIPESTATUS[0]}
    echo "pytest exit code: $TEST_RC"
    [ "$TEST_RC" = 0 ] || FAILED+=("tests($TEST_RC)")
fi

CUDA_FLAG=(--cuda)
[ "$DRY" = 1 ] && CUDA_FLAG=()

step "CPU vs CUDA digests (limit 100s)"
DIGEST_SIZE=35M
[ "$DRY" = 1 ] && DIGEST_SIZE=2M
timeout 100 "$PY" -m benchmarks.gpu.device_digest --size "$DIGEST_SIZE" --cache "$CACHE" \
    || FAILED+=("digest")

if [ "$(left)" -gt 270 ]; then
    REPORT_SIZE=35M
    [ "$DRY" = 1 ] && REPORT_SIZE=2M
    step "report cost, ${CUDA_FLAG[*]:-cpu}, $REPORT_SIZE float32 (limit 90s)"
    timeout 90 "$PY" -m benchmarks.speed.run --size "$REPORT_SIZE" --variants 3 --rounds 1 \
        --kernel-rounds 2 --parts report "${CUDA_FLAG[@]}" --cache "$CACHE" --out "$OUT_DIR" \
        --name "device-report" || FAILED+=("report-cost")
fi

REMAIN=$(left)
SIZE=1B
# ~1B: generating the bf16 family takes ~70 s there, each merge ~40 s
if [ "$DRY" = 1 ]; then SIZE=9M; elif [ "$REMAIN" -lt 180 ]; then SIZE=350M; fi
step "circuit vs della, --cuda, $SIZE bf16, 3 variants (limit $(( REMAIN - 15 ))s)"
if [ "$REMAIN" -gt 90 ]; then
    timeout $(( REMAIN - 15 )) "$PY" -m benchmarks.speed.run --size "$SIZE" --dtype bf16 --variants 3 \
        --rounds 1 --methods circuit,della --parts compare --no-warmup "${CUDA_FLAG[@]}" \
        --cache "$CACHE" --out "$OUT_DIR" --name "device-$SIZE" || FAILED+=("timing")
else
    echo "skipped: only ${REMAIN}s left"; FAILED+=("timing-skipped")
fi

step "done in $((SECONDS - START))s"
if [ ${#FAILED[@]} -eq 0 ]; then echo "DEVICE CHECK PASSED"; exit 0; fi
echo "DEVICE CHECK FAILED: ${FAILED[*]}"
exit 1
