#!/usr/bin/env bash
# One device session: the GPU benchmarks, results written under $OUT (see benchmarks/RESULTS.md).
# The dataset pass against zennit-crp first (issue 5's open figure), then LRP and CRP.
# Needs in .whl/ (ignored by git; carry it) cp312 manylinux wheels of what the device's python
# lacks, one version each: zennit 0.4.6, zennit-crp 0.6.0, zarr 3.1.6, numcodecs 0.16.6,
# donfig 0.8.1.post1, google-crc32c 1.9.0, hydra-core 1.3.8, omegaconf 2.3.1 and
# antlr4-python3-runtime 4.9.3 (an sdist only: `pip wheel --no-deps` it here); how to fetch them:
# /work/.library/device/README.md. About 10 MB in all.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
cd benchmarks
timeout 300 python3 bench_featvis.py --device cuda --n 2048 --batch 64 --chunk 256 --workers 4 --rounds 3 --json "$OUT/featvis_gpu.json" 2>&1 | tee "$OUT/featvis_gpu.md"
timeout 120 python3 bench_lrp.py --device cuda --rounds 5 --json "$OUT/lrp_gpu.json" --time-budget 90 2>&1 | tee "$OUT/lrp_gpu.md"
timeout 150 python3 bench_crp.py --device cuda --rounds 3 --memory-budget 17179869184 --json "$OUT/crp_gpu.json" 2>&1 | tee "$OUT/crp_gpu.md"
