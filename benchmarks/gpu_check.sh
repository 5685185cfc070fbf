#!/usr/bin/env bash
# The CUDA check of issue 17, in one go on a CUDA machine without network (the H200 lent to some
# sessions): install what is missing from carried wheels, run the CUDA tests, run the GPU speed
# sweep, and write everything to OUTDIR. Finishes inside 8 minutes (GPU_CHECK_BUDGET seconds,
# default 450, with a `timeout` on every step); exits non-zero when any step failed or ran out of
# time, and says which in OUTDIR/summary.md and on stdout.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # or: make gpu-check GPU_OUT=OUTDIR
#
# Before: on a machine with network, benchmarks/fetch_gpu_wheels.sh downloads the wheels into
# benchmarks/wheels/ (gitignored, ~18 MB). They are not in git, so the device run must carry them:
#
#   run(command="bash benchmarks/gpu_check.sh $OUT/gpu-check", carry=["benchmarks/wheels"], timeout_s=540)
#
# What it expects there: Python 3.12 with PyTorch 2.11 (CUDA) and torchvision, numpy, pillow,
# pyarrow, opencv-python-headless, scikit-image and pytest (the H200 image has them all; they are
# not carried: too large, or tied to the machine's torch). The package runs from this source tree
# (PYTHONPATH), not pip-installed (pyproject pins torch 2.14.1 for CPU installs).
#
# OUTDIR gets at most 6 files (the device run returns 8 at most): log.txt (every step's output),
# steps.tsv (step, exit code, seconds), cuda-tests.xml (JUnit), bench-ViT-B-16.json,
# bench-ViT-L-14.json, summary.md.
#
# GPU_CHECK_STEPS="env install tests bench" picks steps (default all); PYTHON=python3.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
outdir="$(cd "$1" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo" || exit 2
py="${PYTHON:-python3}"
wheels="$repo/benchmarks/wheels"
budget="${GPU_CHECK_BUDGET:-450}"
steps="${GPU_CHECK_STEPS:-env install tests bench}"
started=$(date +%s)
log="$outdir/log.txt"
: >"$log"
printf 'step\texit\tseconds\n' >"$outdir/steps.tsv"
failed=0
# The text cache stays out of OUTDIR: only the files listed above come back from the device run.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TAGCLIP_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-cache.XXXXXX")" || exit 2
export TAGCLIP_CACHE_DIR

# step NAME LIMIT_SECONDS COMMAND...: run with a timeout (never past the overall budget), output to
# the log and stdout, exit code and seconds to steps.tsv.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - started)))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: not run, the ${budget}s budget is spent ===" | tee -a "$log"
        printf '%s\tno-time\t0\n' "$name" >>"$outdir/steps.tsv"
        failed=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local cmd="$*"
    cmd="${cmd//$'\n'/ }"
    [ ${#cmd} -gt 160 ] && cmd="${cmd:0:157}..."
    echo "=== $name (limit ${limit}s): $cmd ===" | tee -a "$log"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s ===" | tee -a "$log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$outdir/steps.tsv"
    [ "$rc" -ne 0 ] && failed=1
    return "$rc"
}

wants() { [[ " $steps " == *" $1 "* ]]; }

# ---- env: the machine, and stop early without CUDA ------------------------------------------------
if wants env; then
    step env 60 bash -c "nvidia-smi || true; $py - <<'EOF'
import platform, sys
import torch
print('python', sys.version.split()[0], platform.machine())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit('gpu_check: torch sees no CUDA device')
p = torch.cuda.get_device_properties(0)
print('device', p.name, round(p.total_memory / 2**30, 1), 'GiB', 'sm', f'{p.major}.{p.minor}', 'count', torch.cuda.device_count())
print('nccl', torch.cuda.nccl.version(), 'bf16', torch.cuda.is_bf16_supported())
EOF" || { echo "gpu_check: no usable CUDA device; nothing else runs" | tee -a "$log"; steps=""; }
fi

# ---- install: what is missing, from the carried wheels --------------------------------------------
install() {
    # One process, no imports (find_spec): which modules are absent, by pip name.
    local probe='import importlib.util as u, sys
names = dict(a.split(":") for a in sys.argv[1:])
print(" ".join(p for m, p in names.items() if u.find_spec(m) is None))'
    local carried=(open_clip:open_clip_torch ftfy:ftfy wcwidth:wcwidth pycocotools:pycocotools
                   safetensors:safetensors typer:typer rich:rich timm:timm regex:regex huggingface_hub:huggingface_hub)
    local image=(torchvision:torchvision numpy:numpy PIL:pillow pyarrow:pyarrow cv2:opencv-python-headless
                 skimage:scikit-image pytest:pytest)
    local missing absent
    absent=$("$py" -c "$probe" "${image[@]}") || return 1
    if [ -n "$absent" ]; then
        echo "gpu_check: this machine lacks $absent, which are not carried (too large or tied to its torch)"
        return 1
    fi
    missing=$("$py" -c "$probe" "${carried[@]}") || return 1
    if [ -n "$missing" ]; then
        echo "missing: $missing"
        if [ ! -f "$wheels/README" ]; then
            echo "gpu_check: no wheels in $wheels: run benchmarks/fetch_gpu_wheels.sh where there is network," \
                 "and pass carry=[\"benchmarks/wheels\"] to the device run"
            return 1
        fi
        "$py" benchmarks/check_wheels.py "$wheels" --installed || echo "(pip resolves against what is installed)"
        local pipargs=(-m pip install --no-index --find-links "$wheels" --no-cache-dir --disable-pip-version-check)
        # shellcheck disable=SC2086  # the names are words
        "$py" "${pipargs[@]}" $missing || "$py" "${pipargs[@]}" --break-system-packages $missing || return 1
    else
        echo "nothing missing"
    fi
    "$py" -c "import open_clip, ftfy, wcwidth, pycocotools.mask, safetensors, typer, rich, pyarrow, cv2, torchvision
print('open_clip', open_clip.__version__, 'torchvision', torchvision.__version__, 'pyarrow', pyarrow.__version__,
      'cv2', cv2.__version__)" || return 1
    "$py" -m tagclip_cli --version
}
if wants install; then
    step install 120 bash -c "$(declare -f install); py='$py' wheels='$wheels' install"
fi

# ---- tests: pytest -m cuda -------------------------------------------------------------------------
if wants tests; then
    step tests 230 "$py" -m pytest -m cuda -v -rA -p no:cacheprovider --junitxml "$outdir/cuda-tests.xml" \
        tests/test_cuda.py
fi

# ---- bench: the GPU sweep, ViT-B/16 then ViT-L/14 ------------------------------------------------
if wants bench; then
    for model in ViT-B-16 ViT-L-14; do
        limit=70
        [ "$model" = ViT-L-14 ] && limit=90
        step "bench-$model" "$limit" "$py" benchmarks/bench_speed.py --device cuda --model "$model" \
            --precision fp32,bf16,fp16 --batch-sizes 8,16,32,64 --rounds 2 --json-out "$outdir/bench-$model.json"
    done
fi

# ---- summary ---------------------------------------------------------------------------------------
"$py" - "$outdir" "$(($(date +%s) - started))" <<'EOF' || failed=1
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
lines = [f"# gpu_check ({seconds} s)", "", "| step | exit | seconds |", "| --- | ---: | ---: |"]
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:] if line]
lines += [f"| {name} | {rc} | {sec} |" for name, rc, sec in steps]
env = [line for line in (out / "log.txt").read_text().splitlines()
       if line.startswith(("python ", "torch ", "device ", "nccl "))]
if env:
    lines += ["", *[f"    {line}" for line in env]]
junit = out / "cuda-tests.xml"
if junit.exists():
    lines += ["", "## CUDA tests", "", "| test | result | seconds |", "| --- | --- | ---: |"]
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        message = (bad.get("message") or "").strip().splitlines() if bad is not None else []
        result = "passed" if bad is None else f"{bad.tag}: {message[0][:150] if message else ''}"
        lines.append(f"| {case.get('name')} | {result} | {float(case.get('time', 0)):.1f} |")
for path in sorted(out.glob("bench-*.json")):
    data = json.loads(path.read_text())
    lines += ["", f"## {data['model']} on {data['device_name']} (torch {data['torch']})", "",
              f"decode + resize + normalise: {data['decode_images_per_s_one_process']:.0f} images/s in one process"
              + (f"; GPU JPEG decode {data['gpu_jpeg_decode_images_per_s']:.0f} images/s"
                 if data.get("gpu_jpeg_decode_images_per_s") else ""), "",
              "| precision | batch | annotate img/s | segment img/s | peak GB annotate | peak GB segment | decode | "
              "encoder | attn maps | CWR crops | TagCLIP rest | CLS-SEG |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in data["rows"]:
        if row.get("oom"):
            lines.append(f"| {row['precision']} | {row['batch_size']} | out of memory |" + " |" * 9)
            continue
        seg = row.get("segment_images_per_s")
        seg_text = f"{seg:.0f}" if seg else "n/a"
        shares = " | ".join(f"{100 * v:.0f}%" for v in row["share"].values())
        lines.append(f"| {row['precision']} | {row['batch_size']} | {row['annotate_images_per_s']:.0f} | {seg_text} | "
                     f"{row['peak_mb_annotate'] / 1024:.1f} | {(row.get('peak_mb_segment') or 0) / 1024:.1f} | "
                     f"{shares} |")
failed = [s for s in steps if s[1] != "0"]
lines += ["", "FAILED: " + ", ".join(f"{n} ({rc})" for n, rc, _ in failed) if failed else "all steps passed"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit "$failed"
