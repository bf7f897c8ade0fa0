# Ocellus: a release build on Debian 12 (FFmpeg 5.1), run on a slim image as a non-root user.
#   docker build -t ocellus .
#   docker run -p 8000:8000 ocellus                               # the built-in fixture model
#   docker run -p 8000:8000 -v /models:/models ocellus serve --model /models/SmolVLM2-500M-Video-Instruct
# (Issue 5 extends this: cached dependency layer, HEALTHCHECK, a CUDA variant.)

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY scripts/system-deps.sh scripts/system-deps.sh
# FFmpeg's development files, pkg-config and libclang: what the video decoder builds against.
RUN scripts/system-deps.sh
COPY . .
RUN cargo build --release --locked --bin ocellus

FROM debian:bookworm-slim
# FFmpeg's runtime libraries (video decoding) and CA certificates (media by https URL).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libavcodec59 libavformat59 libavutil57 libswscale6 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /srv/ocellus ocellus
COPY --from=build /src/target/release/ocellus /usr/local/bin/ocellus
# The built-in model is found where it was built.
COPY --from=build /src/tests/fixtures/models /src/tests/fixtures/models
USER ocellus
EXPOSE 8000
ENTRYPOINT ["ocellus"]
CMD ["serve"]
