#!/usr/bin/env bash
# Build and install llama-cpp-python (the local CPU fallback model) for a portable CPU target.
#
# llama-cpp-python compiles llama.cpp at install, and by default for the build machine's own CPU
# (GGML_NATIVE). A wheel built that way dies with SIGILL on any other CPU, and on virtual machines
# that advertise instructions they do not let a process use (AVX-512, AMX). This script builds with
# explicit flags instead. The default x86-64 target is AVX2 + FMA + F16C + BMI2: every Intel CPU since
# Haswell (2013) and every AMD CPU since Zen (2017). No AVX-512, no AMX.
#
# Override for other CPUs with LLAMA_CMAKE_ARGS, e.g. for a pre-2013 x86-64:
#   LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF" make run
#
# The wheel is kept in $LLAMA_WHEEL_DIR/<key>/, where the key hashes the version, the flags and the
# architecture: a changed flag builds a new wheel, and pip's own wheel cache is never used for it
# (pip keys its cache by the source archive only, so it would silently reuse a native build).
set -euo pipefail

PIP=${PIP:-pip}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
ARCH=$(uname -m)
if [ -z "${LLAMA_CMAKE_ARGS:-}" ]; then
    case "$ARCH" in
        x86_64 | amd64)
            LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
        *)
            LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF" ;;
    esac
fi
# llava/mtmd (image input) is never used by the bot; skipping it halves the build.
LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DLLAVA_BUILD=OFF"
KEY=$(printf '%s|%s|%s' "$VERSION" "$LLAMA_CMAKE_ARGS" "$ARCH" | sha256sum | cut -c1-16)
DIR="${LLAMA_WHEEL_DIR:-$HOME/.cache/personabot/wheels}/llama-$KEY"

if ! ls "$DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION for $ARCH with: $LLAMA_CMAKE_ARGS" >&2
    rm -rf "$DIR.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        "$PIP" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$DIR.tmp"
    printf '%s\n' "$LLAMA_CMAKE_ARGS" >"$DIR.tmp/CMAKE_ARGS"
    rm -rf "$DIR"
    mv "$DIR.tmp" "$DIR"
fi
"$PIP" install --force-reinstall --no-deps "$DIR"/llama_cpp_python-*.whl
"$PIP" install "$DIR"/llama_cpp_python-*.whl
