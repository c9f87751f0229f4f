#!/usr/bin/env bash
# The GPU proof on a machine where attnseg is not installed (the lent GPU: no diffusers, no
# package registry). Run from the repository root.
#
#   bash bench/gpu_proof.sh download [DIR]   # here, where pip works: the wheels that machine
#                                            # lacks (bench/gpu_wheels.txt) into DIR (.dev/whl)
#   bash bench/gpu_proof.sh [DIR] [ARGS...]  # there: install what this Python lacks from DIR
#                                            # into /tmp, then `attnseg bench gpu ARGS`
#
# Results: bench/results/gpu/gpu.json and gpu.md (or --out). Keep the run under 8 minutes: the
# default budget is 450 s (--set budget_s=N).
set -euo pipefail
if [[ "${1:-}" == download ]]; then
  D=${2:-.dev/whl}; mkdir -p "$D"
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$D" -r bench/gpu_wheels.txt
  echo "wheels in $D ($(du -sh "$D" | cut -f1))"; exit 0
fi
WHL=.dev/whl
if [[ $# -gt 0 && -d "$1" ]]; then WHL=$1; shift; fi
SITE=${SITE:-/tmp/attnseg-site}; ROOT=${ROOT:-/tmp/attnseg-root}
PY=${PY:-python3}
[[ -f kernels/class_attention.py ]] || { echo "run from the attnseg repository root"; exit 2; }
mkdir -p "$SITE" "$ROOT/attnseg"
# Only distributions this Python lacks are unpacked (wheels are zip files): nothing installed
# there is shadowed.
"$PY" - "$WHL" "$SITE" <<'PYEOF'
import importlib.metadata as md, re, sys, zipfile
from pathlib import Path
whl, site = Path(sys.argv[1]), Path(sys.argv[2])
added = []
for f in sorted(whl.glob("*.whl")):
    dist = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        zipfile.ZipFile(f).extractall(site)
        added.append(dist)
print("carried wheels unpacked:", " ".join(added) or "none needed")
PYEOF
for sub in kernels pipeline engines bench; do ln -sfn "$PWD/$sub" "$ROOT/attnseg/$sub"; done
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/attnseg-cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/attnseg-cache/inductor}
exec "$PY" -m attnseg.pipeline.cli bench gpu "$@"
