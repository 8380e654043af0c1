# syntax=docker/dockerfile:1
# personabot: the chat bot for Discord and Matrix, with /healthz and /metrics on port 8080.
#
#   docker build -t personabot .                               # models on Ollama only
#   docker build -t personabot --build-arg LOCAL_MODEL=true .  # + the CPU fallback (SmolLM2)
#     llama.cpp is built for a portable x86-64 target (AVX2/FMA/F16C, no AVX-512/AMX), not for
#     the build machine's CPU, so the image runs wherever it is pulled; other targets with
#     --build-arg LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF ..." (see deploy/llama-wheel.sh)
#   docker build -t personabot --build-arg EXTRAS=matrix-e2e . # + Matrix encryption
#   docker run --env-file bot.env -p 127.0.0.1:8080:8080 personabot
#
# Secrets (DISCORD_TOKEN, DATABASE_URL, FAL_KEY, ...) are given at run time, never baked in.
# Without DATABASE_URL the embedded PostgreSQL keeps its data in /data: mount a volume there.

# Pinned base image: an exact Python patch release on Debian bookworm (pin the digest too with
# python:3.11.14-slim-bookworm@sha256:... when your registry mirror allows).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG LOCAL_MODEL=false
# Empty: deploy/llama-wheel.sh's portable default. Never GGML_NATIVE: the build CPU is not the host's.
ARG LLAMA_CMAKE_ARGS=""
# Other optional extras, comma-separated, e.g. EXTRAS=matrix-e2e for encrypted Matrix rooms.
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_BUILD_PARALLEL_LEVEL=2
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A C/C++ toolchain only for llama-cpp-python, which compiles llama.cpp at install.
# hadolint ignore=DL3008
RUN if [ "$LOCAL_MODEL" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# llama-cpp-python compiles llama.cpp at install; the script pins the CPU flags (and the version)
# before pip can build it for this machine's CPU.
COPY deploy/llama-wheel.sh deploy/llama-wheel.sh
RUN if [ "$LOCAL_MODEL" = "true" ]; then \
        LLAMA_WHEEL_DIR=/tmp/llama-wheels LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" \
            bash deploy/llama-wheel.sh \
        && rm -rf /tmp/llama-wheels; \
    fi
COPY pyproject.toml README.md ./
COPY bot/ bot/
# The project itself (its dependencies are pinned by pyproject.toml's ranges).
# hadolint ignore=DL3013
RUN extras="${EXTRAS}"; \
    if [ "$LOCAL_MODEL" = "true" ]; then extras="${extras:+${extras},}local"; fi; \
    pip install --no-cache-dir ".${extras:+[${extras}]}"

FROM ${PYTHON_IMAGE} AS runtime
ARG LOCAL_MODEL=false
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# llama.cpp needs the OpenMP runtime; nothing else is added to the slim image.
# hadolint ignore=DL3008
RUN if [ "$LOCAL_MODEL" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libgomp1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --system --gid 10001 bot \
    && useradd --system --uid 10001 --gid bot --create-home --home-dir /home/bot \
       --shell /usr/sbin/nologin bot \
    && mkdir /data \
    && chown bot:bot /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY personas/ personas/
COPY prompts/ prompts/
COPY migrations/ migrations/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PERSONAS_DIR=/app/personas \
    PROMPTS_DIR=/app/prompts \
    MIGRATIONS_DIR=/app/migrations \
    DATA_DIR=/data \
    LOCAL_MODEL_ENABLED=${LOCAL_MODEL} \
    LOG_FORMAT=json \
    LOG_LEVEL=INFO \
    LOG_FILE=false \
    WEB_HOST=0.0.0.0 \
    WEB_PORT=8080
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-m", "bot", "healthcheck"]
# Migrations first (they also run at start, under a lock), then the bot; exec so that SIGTERM
# reaches it and replies in flight are finished before it exits.
CMD ["sh", "-c", "python -m bot migrate && exec python -m bot run"]
