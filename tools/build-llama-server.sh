#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the llama.cpp vendored in the PyPI sdist of llama-cpp-python
# and caches it OUTSIDE the repo, so tests can run a real engine offline (registries only, no GitHub).
#
#   tools/build-llama-server.sh            -> prints the path of the cached llama-server binary
#
# Cache: ${SPOTGUARD_CACHE:-$HOME/.cache/spotguard}/llama-server-<version>/ holds the binary, the shared
# libraries it needs (found through its RPATH=$ORIGIN), and ggml-vocab-llama-spm.gguf (the tokenizer
# tools/make_tiny_model.py copies). A second run finds the cache complete and returns at once.
# Needs: cmake, a C++17 compiler, make or ninja, and pip (from .venv when present) to fetch the sdist.
# About 5-11 minutes on 2 cores. Env: SPOTGUARD_CACHE, LLAMA_BUILD_JOBS (default 2),
# LLAMA_KEEP_BUILD=1 keeps the build tree for a faster rebuild.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE_ROOT="${SPOTGUARD_CACHE:-$HOME/.cache/spotguard}"
DEST="$CACHE_ROOT/llama-server-$VERSION"
JOBS="${LLAMA_BUILD_JOBS:-2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The stamp is written last, so an interrupted build is never mistaken for a finished one.
if [[ -f "$DEST/.complete" && -x "$DEST/llama-server" ]]; then
    echo "$DEST/llama-server"
    exit 0
fi

# Two builds in one tree corrupt each other (seen: two worktrees' `make test` at once): the second waits.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.llama-server-build.lock"
flock 9
if [[ -f "$DEST/.complete" && -x "$DEST/llama-server" ]]; then
    echo "$DEST/llama-server"
    exit 0
fi

PIP=(python3 -m pip)
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PIP=("$REPO_ROOT/.venv/bin/python" -m pip)
fi

WORK="$CACHE_ROOT/build-llama-server-$VERSION"
mkdir -p "$WORK"

SDIST_DIR="$WORK/sdist"
SRC="$SDIST_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    mkdir -p "$SDIST_DIR"
    "${PIP[@]}" download --quiet --no-deps --no-binary :all: --dest "$SDIST_DIR" \
        "llama-cpp-python==$VERSION" >&2
    tar -xzf "$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz" -C "$SDIST_DIR"
fi

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
fi

# Only what llama-server needs: no tests/examples, portable CPU code (the cache may move between
# machines of the same kind), no network features (no curl/openssl here).
cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON >&2
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$DEST"
cp -f "$WORK/build/bin/llama-server" "$DEST/"
find "$WORK/build/bin" -maxdepth 1 -name '*.so*' -exec cp -af {} "$DEST/" \;
cp -f "$SRC/models/ggml-vocab-llama-spm.gguf" "$DEST/"
echo "$VERSION" >"$DEST/.complete"
# The build tree (~350 MB) and the sdist are not needed once the binary is cached.
if [[ -z "${LLAMA_KEEP_BUILD:-}" ]]; then
    rm -rf "$WORK"
fi
echo "$DEST/llama-server"
