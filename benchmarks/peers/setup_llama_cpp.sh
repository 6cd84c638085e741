#!/usr/bin/env bash
# Build llama.cpp's own HTTP server, `llama-server`, from the llama.cpp source that the PyPI package
# llama-cpp-python ships in its sdist (vendor/llama.cpp). llama-cpp-python's own Python server handles
# one request at a time, so it is not a fair peer; llama-server does continuous batching over parallel
# slots. Nothing is installed into the project's venv; the result is
#   benchmarks/peers/.work/llama-cpp/bin/llama-server (and llama-quantize, llama-perplexity, llama-bench)
#
# Cost: ~20 minutes of both cores on a 2-core machine (don't run it while measuring anything else).
# Needs: cmake >= 3.18, a C++17 compiler, and PyPI for `pip download` (no other network access:
# the web UI's prebuilt assets and libcurl downloads are switched off).
#
#   bash benchmarks/peers/setup_llama_cpp.sh            # JOBS=2 LLAMA_CPP_PYTHON_VERSION=0.3.36 by default
set -euo pipefail
source "$(dirname "$0")/common.sh"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
SDIST_DIR="$LLAMA_CPP_DIR/sdist"
SRC_ROOT="$LLAMA_CPP_DIR/src"
BUILD_DIR="$LLAMA_CPP_DIR/build"

if [[ -x "$LLAMA_SERVER_BIN" && "${FORCE:-0}" != 1 ]]; then
    echo "already built: $LLAMA_SERVER_BIN (FORCE=1 to rebuild)"
    exit 0
fi
command -v cmake >/dev/null || { echo "cmake is required (apt-get install cmake)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "a C++ compiler is required (apt-get install g++)" >&2; exit 1; }
mkdir -p "$SDIST_DIR" "$SRC_ROOT" "$LLAMA_CPP_DIR/bin"

# 1. The sdist, fetched by pip from PyPI into a private venv (only used for `pip download`).
if [[ ! -x "$LLAMA_CPP_DIR/venv/bin/pip" ]]; then
    "$BASE_PY" -m venv "$LLAMA_CPP_DIR/venv"
fi
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$LLAMA_CPP_DIR/venv/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

# 2. Unpack and find the vendored llama.cpp.
SRC="$SRC_ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$SRC_ROOT"
fi
[[ -f "$SRC/tools/server/CMakeLists.txt" ]] || { echo "no tools/server in $SRC: unexpected sdist layout" >&2; exit 1; }

# 3. Configure: release build, CPU only, static libs (one self-contained binary), no curl/openssl,
#    no web UI assets (they would be built with npm or downloaded), no tests/examples.
#    AMX is switched off: this VM's CPU advertises AMX but the guest cannot use the tile registers,
#    and ggml's AMX matmul segfaults at the first decode (seen here with llama.cpp from 0.3.36).
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$BUILD_DIR" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CCACHE=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF

# 4. Build the server, and the tools the quantization benchmarks use (a Q4_K_M file from the float
#    GGUF, llama.cpp's own perplexity on the same text, single-stream decode speed).
TARGETS="${TARGETS:-llama-server llama-quantize llama-perplexity llama-bench}"
# shellcheck disable=SC2086
cmake --build "$BUILD_DIR" --target $TARGETS -j "$JOBS"
for target in $TARGETS; do cp "$BUILD_DIR/bin/$target" "$LLAMA_CPP_DIR/bin/"; done
"$LLAMA_SERVER_BIN" --version || true
echo "built: $LLAMA_SERVER_BIN"
