#!/usr/bin/env bash
# Installs the Azurite Blob emulator (npm package `azurite`) into a cache dir outside the repo.
# Idempotent: does nothing when the pinned version is already there. Tests find it through
# ${SPOTGUARD_CACHE:-~/.cache/spotguard}/azurite/node_modules/.bin/azurite-blob.
set -euo pipefail

AZURITE_VERSION="${AZURITE_VERSION:-3.35.0}"
CACHE="${SPOTGUARD_CACHE:-$HOME/.cache/spotguard}"
DEST="$CACHE/azurite"
BIN="$DEST/node_modules/.bin/azurite-blob"

command -v npm >/dev/null || { echo "setup-azurite: npm not found (apt-get install nodejs npm)" >&2; exit 1; }

if [[ -x "$BIN" ]] && [[ "$(cat "$DEST/.version" 2>/dev/null)" == "$AZURITE_VERSION" ]]; then
    echo "setup-azurite: azurite $AZURITE_VERSION already in $DEST"
    exit 0
fi

mkdir -p "$DEST"
# --prefix keeps it out of the repo and out of the global node tree; no audit/fund network chatter.
npm install --prefix "$DEST" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION"
echo "$AZURITE_VERSION" > "$DEST/.version"
"$BIN" --version >/dev/null
echo "setup-azurite: installed azurite $AZURITE_VERSION -> $BIN"
