# syntax=docker/dockerfile:1
# Ocellus in a container: built on Debian 12 (FFmpeg 5.1), run on a slim image as a
# non-root user. .ci/run runs the build stages' commands outside Docker
# (scripts/dockerfile-build.py), so that a broken step fails CI.
#
#   docker build -t ocellus .
#   docker run -p 8000:8000 ocellus                                  # the built-in model
#   docker run -p 8000:8000 -v /srv/models:/models:ro ocellus serve --model /models/SmolVLM2-500M-Video-Instruct
#   docker run -p 8000:8000 -v hf:/data/hf ocellus serve --model HuggingFaceTB/SmolVLM-256M-Instruct
#
# CUDA: the same file with CUDA images and the `cuda` feature (see README, Deploy):
#   docker build -t ocellus:cuda --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 --build-arg FEATURES=cuda .

ARG BUILD_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS toolchain
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA images come without Rust.
ENV PATH=/root/.cargo/bin:${PATH}
# hadolint ignore=DL3008
RUN if ! command -v cargo >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
      && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY scripts/system-deps.sh scripts/build-release.sh scripts/cargo-skeleton.sh scripts/
RUN scripts/system-deps.sh

# The manifests with every target stubbed (scripts/cargo-skeleton.sh reads the targets from
# `cargo metadata`): unchanged unless Cargo.toml, Cargo.lock, build.rs or proto/ change, so
# the dependency layer below is rebuilt only then.
FROM toolchain AS skeleton
COPY . .
RUN scripts/cargo-skeleton.sh skeleton

FROM toolchain AS build
ARG FEATURES=""
COPY --from=skeleton /src/skeleton ./
RUN scripts/build-release.sh ${FEATURES:+--features "$FEATURES"} \
    && rm -rf src benches tests target/release/.fingerprint/ocellus-*
COPY . .
RUN scripts/build-release.sh ${FEATURES:+--features "$FEATURES"}

FROM ${RUNTIME_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# FFmpeg's runtime libraries (whatever versions this distribution calls them), CA
# certificates for media and models by https, curl for the health check.
# hadolint ignore=DL3008,SC2046
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
       $(apt-cache search --names-only '^lib(avcodec|avformat|avutil|swscale)[0-9]+$' | cut -d' ' -f1) \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --create-home --home-dir /home/ocellus ocellus \
    && mkdir -p /data/hf && chown ocellus /data/hf
COPY --from=build /src/target/release/ocellus /usr/local/bin/ocellus
# The built-in models as folders (the binary carries them too; the compose file names this).
COPY --from=build /src/models /src/models
# The fixture models too, for trying the parity fixtures in the container.
COPY --from=build /src/tests/fixtures/models /src/tests/fixtures/models
ENV OCELLUS_HOST=0.0.0.0 OCELLUS_PORT=8000 OCELLUS_GRPC_PORT=50051 HF_HOME=/data/hf
USER 10001
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${OCELLUS_PORT}/health || exit 1"]
ENTRYPOINT ["ocellus"]
CMD ["serve"]
