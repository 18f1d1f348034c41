#!/usr/bin/env bash
# Configure, build and run the CMake/CTest unit tests (the shared kernel headers of csrc/include:
# orbit_math.h, static_switch.h, layer_desc.h, multi_math.h, launch_plan.h, steerable_math.h; and the
# ops library).
# Exits non-zero if any step fails.  Env: BUILD_DIR (default build/cmake), PYTHON (default python3),
# JOBS (default 2), PROJKERNELS_BUILD_OPS=OFF to skip the libtorch part.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/cmake}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
JOBS="${JOBS:-2}"
# Torch's CMake config would otherwise try to run a GPU-detection program.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"

EXTRA=()
# A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit even for CPU targets.
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
if [ -x "$CUDA_ROOT/bin/nvcc" ]; then
  EXTRA+=("-DCUDAToolkit_ROOT=$CUDA_ROOT" "-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT" "-DCMAKE_CUDA_COMPILER=$CUDA_ROOT/bin/nvcc")
fi

cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$PYTHON" -DPROJKERNELS_BUILD_OPS="${PROJKERNELS_BUILD_OPS:-ON}" "${EXTRA[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error
