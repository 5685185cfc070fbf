#!/usr/bin/env bash
# Remake docs/gallery.png, the README's first picture: the offline first run (README "A first run,
# offline": annotate + segment with the shipped shapes-demo model on examples/shapes/images, then
# show) captured by headless Chromium at 1200x800 and reduced to 256 colours.
#
#   bash benchmarks/make_gallery_png.sh [OUT.png]      (default docs/gallery.png)
#
# Needs the tool's Python (PYTHON, default .venv/bin/python) and Debian's chromium (CHROMIUM).
# Rerun it whenever the demo model, the gallery's look or the examples change.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(realpath -m "${1:-docs/gallery.png}")
python=${PYTHON:-.venv/bin/python}
chromium=${CHROMIUM:-chromium}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
images=$root/examples/shapes/images
tagclip() { "$python" -m tagclip_cli "$@" --quiet; }
export TAGCLIP_CACHE_DIR=$work/cache
tagclip annotate "$images" --model shapes-demo --vocab shapes --out "$work/labels.parquet"
tagclip segment "$images" --model shapes-demo --vocab shapes --tags "$work/labels.parquet" --out "$work/masks.json"
tagclip show --images "$images" --tags "$work/labels.parquet" --masks "$work/masks.json" --out "$work/gallery"
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --disable-default-apps --mute-audio --hide-scrollbars \
    --user-data-dir="$work/profile" --window-size=1200,800 --screenshot="$work/shot.png" \
    "file://$work/gallery/index.html" >/dev/null 2>&1
"$python" - "$work/shot.png" "$out" <<'PY'
import sys

from PIL import Image

with Image.open(sys.argv[1]) as shot:
    shot.convert("RGB").quantize(256).save(sys.argv[2], optimize=True)
print(f"wrote {sys.argv[2]}")
PY
