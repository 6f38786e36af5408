#!/usr/bin/env sh
# `make gpu-check`: the 1B readiness check (benchmarks/gpu_check.py) on whatever Python this machine has.
#
# Here (a development machine): the project's .venv. On a lent GPU machine (no network, its own
# python3 with CUDA torch): the wheels that `make gpu-wheels` put in .whl/ and routesae itself are
# installed into /tmp/site first, leaving the machine's torch alone. Output: the check's JSON on
# stdout, and gpu-check.json in runs/gpu-check/ (and in $OUT when it is set).
set -eu
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
  export PYTHONPATH=/tmp/site
  PYTHON=python3
elif [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
else
  PYTHON=python3
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
