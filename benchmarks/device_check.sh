#!/usr/bin/env bash
# The GPU session's one call (at most 8 minutes on one GPU): numerics self-check, training-step
# throughput and memory per host method, sliding-window inference, a phantom run in fp32 and
# bf16. Writes OUT/device_check.md (one Markdown report, device name first) and prints it;
# copy it into docs/performance.md. See docs/performance.md ("GPU") for how to run it.
#
#   benchmarks/device_check.sh [WORK]   # runs and report in WORK (default /tmp/semiseg_device_check)
#
# The report is also copied to $OUT/device_check.md when OUT is set (the device tool's folder
# that comes back), else to runs/device_check.md.
# Python: .venv/bin/python when there is one, else python3. Packages that machine lacks
# (MONAI, nibabel, SimpleITK) may travel as wheels in .whl/ (docs/performance.md); they are
# installed into /tmp/site first. The checkout's src/ is put on PYTHONPATH, so no install of
# semiseg itself is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# TAK's text embeddings travel as a cache folder (.dcache/knowledge, made here by `semiseg
# knowledge encode --class-set synapse --cache-dir .dcache/knowledge`): the GPU machine has no
# offline sentence encoder, and its 83 MB wheel is over what a device call carries.
if [ -d .dcache/knowledge ]; then export SEMISEG_CACHE_DIR="${SEMISEG_CACHE_DIR:-$PWD/.dcache}"; fi
WORK="${1:-/tmp/semiseg_device_check}"
shift $(( $# > 0 ? 1 : 0 ))
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
status=0
timeout 480 "$PY" benchmarks/device_check.py --out "$WORK" "$@" || status=$?
REPORT_TO="${OUT:-runs}"
mkdir -p "$REPORT_TO"
cp "$WORK/device_check.md" "$REPORT_TO/device_check.md" 2>/dev/null || true
exit $status
