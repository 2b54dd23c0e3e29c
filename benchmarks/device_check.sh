#!/bin/bash
# The GPU checks of issue 16 (acceptance 5: `device: cuda`, the tabular GPU path) in one
# call on a lent GPU machine (the `device` tool's `run`, nvidia-h100-x1 or nvidia-h200).
#
# That machine's python3 (3.12) holds torch with CUDA, numpy, h5py, PyYAML, tqdm, pytest
# and pytest-timeout, and nothing can be fetched there: the rest travels as wheels in
# .whl/ (ignored by git). Once, here, in the repository's root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
#       -d .whl mpi4py==4.1.2 mpich==5.0.2 gymnasium==1.4.0 farama-notifications==0.0.6 \
#       pytest-mpi==0.6
#
# (15 MB). Then `run` with command "bash benchmarks/device_check.sh", carry [".whl"] and
# timeout_s 590. Each part has its own time limit, so a slow one cannot starve the rest;
# everything printed is also in $OUT: gpu.txt, tests.log, tests_mpi.log, gpu_scale.log
# and gpu_scale.json. Off that machine (a dry run), CHECK_DEVICE=cpu runs the same parts
# with torch's CPU device standing in (`tests/conftest.py`, `gpu_path`) and the benchmark
# on the CPU path, at CHECK_STEPS env steps a run.
set -u -o pipefail
OUT=${OUT:-/tmp/device_check}
DEVICE=${CHECK_DEVICE:-cuda}
STEPS=${CHECK_STEPS:-400000000}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
BIN=$(python3 -c "import sys, pathlib; print(pathlib.Path(sys.executable).parent)")
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    nproc
    python3 -c "import torch, mpi4py.MPI as M; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), '|', M.Get_library_version().splitlines()[0])"
} 2>&1 | tee "$OUT/gpu.txt"

# 1. The GPU path: samplers equal numpy's, the batched update equals the reference, the
#    transition frequencies pass a chi-square test against P, a resume is bit-exact; then
#    its greedy policies against value iteration (FrozenLake 4x4 and 8x8, CliffWalking,
#    the generated 50x50 map), on one process and on 4 ranks.
timeout -k 10 200 python3 -m pytest -q -p no:cacheprovider --timeout=190 \
    tests/test_table_torch.py tests/test_policies.py -k "gpu_path or torch" 2>&1 |
    tee "$OUT/tests.log"
timeout -k 10 120 "$BIN/mpiexec" -n 4 python3 -m pytest -q -p no:cacheprovider --with-mpi \
    -m mpi tests/test_policies.py -k gpu_path 2>&1 | tee "$OUT/tests_mpi.log"

# 2. env steps/s of the GPU path at 1-16 ranks on the one GPU, against the raw single-env
#    gymnasium loop on the same machine, as ratios (recording on: 24M steps only).
timeout -k 10 240 python3 benchmarks/tabular_scale.py --layouts allreduce \
    --ranks 1 2 4 8 16 --repeats 1 --num-envs 65536 --steps "$STEPS" \
    --set "device=$DEVICE" --json "$OUT/gpu_scale.json" 2>&1 | tee "$OUT/gpu_scale.log"
