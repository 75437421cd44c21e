#!/usr/bin/env bash
# Builds .venv-lowest: spotguard with the LOWEST versions its pyproject.toml allows for each direct
# dependency (uv's --resolution lowest-direct), so the lower bounds are tested, not guessed.
#
#   tools/setup-lowest.sh [PYTHON]      -> prints the venv's python
#
# Rebuilt only when pyproject.toml changes (a stamp holds its hash); uv's download cache lives outside the
# repo in ${SPOTGUARD_CACHE:-~/.cache/spotguard}/uv, so a rebuild after a fresh clone takes seconds.
# The resolution it tested is kept in .venv-lowest/requirements.txt. Needs uv (the test extra installs it
# into .venv) and a package index.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-python3}"
VENV="$REPO_ROOT/.venv-lowest"
UV="${UV:-$REPO_ROOT/.venv/bin/uv}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-${SPOTGUARD_CACHE:-$HOME/.cache/spotguard}/uv}"

[[ -x "$UV" ]] || UV="$(command -v uv || true)"
[[ -n "$UV" ]] || { echo "setup-lowest: uv not found (make setup installs it into .venv)" >&2; exit 1; }

stamp="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

echo "setup-lowest: resolving the lowest allowed direct dependencies (pyproject.toml changed or first run)" >&2
rm -rf "$VENV"
"$UV" venv --quiet --python "$PYTHON" "$VENV" >&2
# Compiled against this interpreter, with the extras the tests need; indirect dependencies stay at
# their newest compatible versions (lowest-direct), as a user's fresh install would get them.
"$UV" pip compile --quiet --python "$VENV/bin/python" --resolution lowest-direct --extra test --extra aws \
    --no-header --output-file "$VENV/requirements.txt" "$REPO_ROOT/pyproject.toml" >&2
VIRTUAL_ENV="$VENV" "$UV" pip install --quiet --requirement "$VENV/requirements.txt" >&2
VIRTUAL_ENV="$VENV" "$UV" pip install --quiet --no-deps --editable "$REPO_ROOT" >&2
echo "$stamp" >"$VENV/.stamp"
echo "setup-lowest: $(grep -cE '^[A-Za-z0-9]' "$VENV/requirements.txt") packages; direct ones at their lower bounds" >&2
echo "$VENV/bin/python"
