#!/usr/bin/env bash
# The GPU check in one command: the GPU-relevant tests on the GPU, then the benchmark on the GPU.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]      (default: docs/bench)
#
# Writes RESULTS_DIR/gpu.json and gpu.md (jaxcnn bench --device gpu: manual vs autodiff vs Flax, PyTorch
# CUDA when installed) and RESULTS_DIR/gpu-check.txt (device, driver, versions, the command, the tests'
# summary). Gradient checks run at the highest matmul precision: the GPU's default (TF32 matmuls and
# convolutions) moves float32 results by about 1e-3, far beyond the checks' tolerances.
#
# Needs a CUDA build of jaxlib (and optax, numpy, tqdm, pytest, hypothesis) already installed; nothing is
# downloaded, so it also runs on machines without network access.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-docs/bench}
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_DEFAULT_MATMUL_PRECISION=highest
summary="$results/gpu-check.txt"

python - <<'PY' | tee "$summary"
import platform, subprocess, sys
import jax, jaxlib
if jax.default_backend() != "gpu":
    sys.exit(f"gpu_check: JAX's default backend is {jax.default_backend()!r}, not 'gpu' (is a CUDA jaxlib installed?)")
import jaxcnn
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True, check=False).stdout.strip()
print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; nvidia-smi: {smi or 'unavailable'}")
print(f"versions: python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"jaxcnn {jaxcnn.__version__}")
PY
echo "command: bash scripts/gpu_check.sh $*" | tee -a "$summary"

# Everything that computes gradients or trains (ops, layers, models, gradient checks, the loop), on the GPU.
tests=(tests/test_ops_conv.py tests/test_ops_pool.py tests/test_ops_elementwise.py tests/test_layers.py
       tests/test_models.py tests/test_gradcheck.py tests/test_per_example.py tests/test_hvp.py tests/test_dp.py
       tests/test_fit.py tests/test_train.py)
tests_status=0
python -m pytest -o addopts="-ra --strict-markers" -p no:cacheprovider -q -m "not slow" "${tests[@]}" > "$results/gpu-tests.log" 2>&1 \
  || tests_status=$?
echo "tests (exit status $tests_status): $(tail -n 1 "$results/gpu-tests.log")" | tee -a "$summary"

python -m jaxcnn bench --device gpu --sections peak steps epoch scaling --json "$results/gpu.json" > "$results/gpu.md"
echo "benchmark: $results/gpu.json, $results/gpu.md" | tee -a "$summary"
exit "$tests_status"
