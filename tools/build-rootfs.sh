#!/usr/bin/env bash
# Builds a minimal Debian root file system from Debian's archive (debootstrap) into a cache dir OUTSIDE
# the repo, for tests that run packer/scripts/install-spotguard.sh under systemd-nspawn on a distribution
# other than this machine's.
#
#   tools/build-rootfs.sh SUITE        -> prints the root file system's path
#
# SUITE bullseye (Debian 11): python3 is 3.9, with venv: the installer's "no suitable Python" path.
# Cache: ${SPOTGUARD_CACHE:-~/.cache/spotguard}/rootfs-SUITE; the stamp is written last, so an interrupted
# build is never mistaken for a finished one. About a minute and 150 MB the first time. Needs root and
# debootstrap (tools/setup-test-tools.sh installs it). Env: DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail

SUITE="${1:?usage: build-rootfs.sh SUITE (e.g. bullseye)}"
case "$SUITE" in
    *[!a-z]*) echo "build-rootfs: $SUITE: expected a Debian suite name such as bullseye" >&2; exit 2 ;;
esac
CACHE="${SPOTGUARD_CACHE:-$HOME/.cache/spotguard}"
DEST="$CACHE/rootfs-$SUITE"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [[ -f "$DEST/.complete" ]]; then
    echo "$DEST"
    exit 0
fi
[[ "$(id -u)" -eq 0 ]] || { echo "build-rootfs: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-rootfs: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }

mkdir -p "$CACHE"
work="$DEST.partial"
rm -rf "$work"
echo "build-rootfs: debootstrap $SUITE from $MIRROR into $DEST (once; cached)" >&2
# minbase + the distribution's own python3 and venv: the installer must refuse it for its version alone.
debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$work" "$MIRROR" >&2
rm -rf "$work/var/cache/apt/archives/"*.deb
rm -rf "$DEST"
mv "$work" "$DEST"
echo "$SUITE" >"$DEST/.complete"
echo "$DEST"
