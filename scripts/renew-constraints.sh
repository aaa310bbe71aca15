#!/usr/bin/env bash
# Write constraints.txt anew: the newest releases the test extra resolves to today, installed in a new virtual
# environment as the README's set-up does, then pinned. Run it with the Python that CI runs (3.11 or newer); the pins
# apply from that version on, and Python 3.10 (which several pinned releases no longer support) resolves freely.
# Run the README's test command against the new pins before committing them.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet torch==2.13.0
"$work/venv/bin/pip" install --quiet -e ".[test]"
marker='; python_version >= "3.11"'
{
    sed -n '/^#/p' constraints.txt
    "$work/venv/bin/pip" freeze --exclude-editable | grep -v -e '^torch==' -e '^pip==' -e '^setuptools==' \
        | sed "s/\$/$marker/"
} > "$work/constraints.txt"
mv "$work/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
