#!/bin/bash
# Train one model on a lent GPU (the `device` tool's machine) and bring the run back, to be generated and
# scored here with calibration_effect.py / model_quality.py. Prepared so that one call does it all:
#
#   here, once:  echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#                mkdir -p .gpu && cp WORKDIR/train.h5 .gpu/          # the training file travels (< 60 MB)
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                    --implementation cp --platform manylinux2014_x86_64 -d .whl zuko==1.6.0
#   device run:  bash benchmarks/device_train.sh MINUTES DETECTOR VARIANT_JSON   (carry .gpu and .whl)
#   back here:   cat /work/.device/N/run.tar.* | tar xf - -C WORKDIR/runs; cp /work/.device/N/*.train.json WORKDIR/runs/
#
# The machine's image has torch, h5py, scikit-learn and tqdm but not zuko; fastshower runs from src/.
# First the CUDA tests (every model: three steps, generation), so that a device bug costs seconds, not the run.
set -euo pipefail
minutes=${1:?minutes of wall time}; detector=${2:?detector}; variant=${3:?'{"NAME": {"model": ..., "hparams": {...}}}'}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py -k cuda 2>&1 | tail -n 15
python3 benchmarks/model_quality.py --detector "$detector" --minutes "$minutes" --clock wall --device cuda \
    --train-only --probe-steps 60 --workdir .gpu --out "$OUT/mq_gpu.json" --variant-json "$variant" 2>&1 \
    | tee "$OUT/log.txt"
# model_quality.py's run name: NAME-<minutes>min
tag=$(python3 -c "import json, sys; print(f'{next(iter(json.loads(sys.argv[1])))}-{float(sys.argv[2]):g}min')" \
    "$variant" "$minutes")
cp ".gpu/runs/$tag.train.json" "$OUT/"
# a checkpoint with optimizer state is ~30 MB: split under the 16 MiB per returned file
tar cf - -C .gpu/runs "$tag" | split -b 15M - "$OUT/run.tar."
ls -la "$OUT"
