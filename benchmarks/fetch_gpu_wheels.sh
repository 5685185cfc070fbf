#!/usr/bin/env bash
# Download, on a machine with network, the wheels benchmarks/gpu_check.sh installs on a CUDA machine
# that has no network: Python 3.12, manylinux x86-64, no dependencies resolved by pip (each needed
# one is listed below, pinned to the versions the CPU venv tests with).
#
#   benchmarks/fetch_gpu_wheels.sh [DIR]      # default benchmarks/wheels (gitignored)
#
# Not downloaded, on purpose: torch, torchvision and nvidia-* (the CUDA machine's own build must be
# used) and the large compiled packages numpy, pillow (both come with torchvision), pyarrow (~42 MB)
# and opencv-python-headless (~50 MB): together they would not fit the 64 MiB that may travel to
# the device machine. The H200 image has all of them; gpu_check.sh stops with their names if not.
# FETCH_HEAVY=1 fetches pyarrow and opencv-python-headless as well, for another machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/wheels}"
py="${PYTHON:-python3}"
mkdir -p "$dir"
wheels=(
    # what gpu_check.sh needs most: open_clip and its text cleaning, COCO masks, the weights format
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pycocotools==2.0.11 safetensors==0.8.0
    # open_clip's other needs
    timm==1.0.31 regex==2026.11.19 tqdm==4.70.1 PyYAML==6.0.4
    huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0
    idna==3.20 truststore==0.10.5 filelock==4.3.1 fsspec==2026.9.0 packaging==26.4 typing_extensions==4.16.0
    # the CLI (typer, rich)
    typer==0.29.2 click==8.5.1 shellingham==1.5.4 annotated-doc==0.0.7 pydantic==2.14.4
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0
)
if [ "${FETCH_HEAVY:-0}" = 1 ]; then
    wheels+=(pyarrow==26.0.1 opencv-python-headless==5.0.0.93)
fi
"$py" -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d "$dir" "${wheels[@]}"
echo "Wheels for benchmarks/gpu_check.sh (Python 3.12, manylinux x86-64). Re-download: benchmarks/fetch_gpu_wheels.sh" \
    >"$dir/README"
# Every requirement of every wheel must be another wheel here or something the image provides.
"$py" "$here/check_wheels.py" "$dir" --provided torch torchvision numpy pillow pyarrow opencv-python-headless
du -sh "$dir"
