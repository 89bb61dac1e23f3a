#!/bin/bash
# One GPU run of configs/demo_synth.yaml and its transfer evaluation, for a GPU machine that has
# Python and torch but not this project's other packages and no network.
#
# Prepare on a machine with network (carried to the GPU machine, about 10 MB):
#   pip download --no-deps -d .devcarry monai==1.6.1 einops nibabel safetensors pyyaml
#   mome train configs/demo_synth.yaml --dry-run      # writes runs/demo_synth/text_embeddings.safetensors
#   mkdir -p .devcarry/runs/demo_synth && cp runs/demo_synth/text_embeddings.safetensors .devcarry/runs/demo_synth/
# Run there (from the repository root, with .devcarry beside it):
#   bash scripts/device_train_demo_synth.sh "$OUT"
# Writes the run folder (weights, log, curves, metrics) and benchmarks/results/synth_transfer_gpu.json
# under the output folder given (default runs/).
set -euo pipefail
out="${1:-runs}"
python -m pip install --no-index --no-deps --quiet .devcarry/*.whl
mkdir -p runs/demo_synth "$out"
cp .devcarry/runs/demo_synth/text_embeddings.safetensors runs/demo_synth/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m MoMESegmentationLib.cli train configs/demo_synth.yaml --device cuda --output "$out/demo_synth"
python benchmarks/bench_synth_transfer.py "$out/demo_synth/model.safetensors" demo \
    --out "$out/synth_transfer_gpu.json"
