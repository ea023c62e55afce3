#!/usr/bin/env bash
# The launcher's supported CPython minors (setup.cfg's "Programming Language :: Python :: 3.N"
# classifiers) that this machine has under pyenv, one "MINOR INTERPRETER" a line, oldest first:
#   bash scripts/pythons.sh            # e.g. "3.12 /root/.pyenv/versions/3.12.1/bin/python3.12"
set -euo pipefail
cd "$(dirname "$0")/.."
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
for minor in $(sed -n 's/^[[:space:]]*Programming Language :: Python :: \(3\.[0-9]*\)[[:space:]]*$/\1/p' setup.cfg | sort -t. -k2 -n); do
    # the newest patch release of that minor
    exe=$(ls -d "$PYENV_ROOT"/versions/"$minor".*/bin/python"$minor" 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$exe" ] && [ -x "$exe" ]; then
        echo "$minor $exe"
    fi
done
