#!/usr/bin/env bash
# One device session: the GPU benchmarks, results written under $OUT (see benchmarks/RESULTS.md).
# Needs in .whl/ the zennit / zennit-crp wheels (pip download --no-deps zennit==0.4.6
# zennit-crp==0.6.0) and, for bench_featvis.py, cp312 manylinux wheels of what the device's
# python lacks: zarr, numcodecs, donfig, google-crc32c, scikit-image and its needs, tqdm
# (see /work/.library/device/README.md).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
cd benchmarks
timeout 200 python3 bench_lrp.py --device cuda --rounds 5 --json "$OUT/lrp_gpu.json" --time-budget 150 2>&1 | tee "$OUT/lrp_gpu.md"
timeout 240 python3 bench_crp.py --device cuda --rounds 3 --memory-budget 17179869184 --json "$OUT/crp_gpu.json" 2>&1 | tee "$OUT/crp_gpu.md"
timeout 300 python3 bench_featvis.py --device cuda --n 2048 --batch 64 --rounds 3 --json "$OUT/featvis_gpu.json" 2>&1 | tee "$OUT/featvis_gpu.md"
