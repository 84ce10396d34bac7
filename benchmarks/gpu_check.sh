#!/usr/bin/env bash
# The GPU measurements of issue 14, as one command for a lent GPU machine (about 6 minutes on an H100/H200):
# ResNet-50 at 224x224 per method against the forward+backward floor measured there (with the peers), and the
# shared-pass figure; the card's name is in each table's Machine line. Writes into $OUT (or ./gpu-out).
#
# The machine's image has torch and torchvision but not the peers. Fetch their pure-Python wheels here first:
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/pip download --no-deps -d .whl captum==0.9.0 grad-cam==1.5.7 ttach==0.0.3
# then run it there with `.whl` carried:  bash benchmarks/gpu_check.sh
set -euo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.csv"
python3 benchmarks/bench_shared.py --device cuda --models resnet50,resnet18 --batch 32 --rounds 5 \
    --out "$out/shared.md" 2>&1 | tee "$out/shared.log"
python3 benchmarks/bench_methods.py --model resnet50 --device cuda --batch 32 --repeats 3 --budget 12 --no-memory \
    --methods saliency,input_x_gradient,guided_backprop,deconvnet,cam,gradcam,gradcam_pp,hirescam,layercam,xgradcam,eigencam,fullgrad,integrated_gradients,smoothgrad,occlusion,scorecam,rise \
    --out "$out/methods.md" 2>&1 | tee "$out/methods.log"
