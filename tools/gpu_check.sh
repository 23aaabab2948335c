#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU tests, then per-tensor rates of each spectral path,
# then a merge of a 7B-shaped pair against the I/O floor. Results go to ${OUT:-gpu-results}/.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 -m pytest -q -x tests/test_gpu.py tests/test_exact.py 2>&1 | tail -5 | tee "$out/tests.txt"
python3 tools/bench.py --kernels --devices cuda --doc "$out/kernels.md" 2>&1 | tail -12
if [ "${GPU_MERGE:-1}" = 1 ]; then
  python3 tools/bench.py --preset llama2-7b --devices auto --lanes 4 --skip-naive --data /tmp/bench-data \
    --doc "$out/merge7b.md" 2>&1 | tail -12
fi
