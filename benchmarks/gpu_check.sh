#!/usr/bin/env bash
# The GPU check in one command, for a machine with one NVIDIA GPU and no network (benchmarks/gpu_check.py
# says what it checks). That machine's image has torch, triton, transformers, accelerate, safetensors and
# pyarrow but not Ray, nor the embedded model; both travel in .gpu-carry/, which
#     benchmarks/gpu_check.sh --pack
# fills here (Ray wheels from ../shared/tools/device-ray-wheels.sh, the embedded model's tokenizer files;
# about 50 MiB, ignored by git). Then, there, from the repository root:
#     benchmarks/gpu_check.sh OUT_DIR          # the check; OUT_DIR/gpu_check-<gpu>.json and the benchmarks' JSON
#     benchmarks/gpu_check.sh --dry-run OUT_DIR   # here: the same steps on the CPU, tiny sizes, this checkout's .venv
# It installs into a virtual environment under /tmp that sees the image's packages, never into the image.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
carry=.gpu-carry

if [[ ${1:-} == --pack ]]; then
  grep -qxF "/$carry/" .git/info/exclude 2>/dev/null || echo "/$carry/" >> .git/info/exclude
  rm -rf "$carry" && mkdir -p "$carry/tokenizer"
  ../shared/tools/device-ray-wheels.sh
  mv .whl "$carry/wheels"
  # The project's own dependencies that the image lacks (its package list: device/KINDS.md): the HTTP
  # stack with its dependencies (pydantic-core must match pydantic), the rest without (numpy is there).
  wheels() { python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" "$@"; }
  wheels pydantic fastapi uvicorn
  wheels --no-deps gguf isal llguidance
  model=$(.venv/bin/python -c "from endor_ray.compress.default_model import default_model_dir; print(default_model_dir())")
  for name in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    if [[ -f $model/$name ]]; then cp "$model/$name" "$carry/tokenizer/"; fi
  done
  du -sh "$carry"
  exit 0
fi

if [[ ${1:-} == --dry-run ]]; then
  out=${2:?usage: gpu_check.sh --dry-run OUT_DIR}
  exec "${PYTHON:-$root/.venv/bin/python}" benchmarks/gpu_check.py --dry-run --out "$out" "${@:3}"
fi

out=${1:?usage: gpu_check.sh OUT_DIR (or --pack, or --dry-run OUT_DIR)}
test -d "$carry/wheels" || { echo "no $carry/wheels: run 'benchmarks/gpu_check.sh --pack' where a registry is reachable and carry $carry" >&2; exit 2; }
venv=/tmp/endor-gpu-check-venv
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --no-index --no-deps "$carry"/wheels/*.whl
# The project itself (and its C decoder), editable as in a checkout
"$venv/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1
exec "$venv/bin/python" benchmarks/gpu_check.py --out "$out" --tokenizer "$carry/tokenizer" "${@:2}"
