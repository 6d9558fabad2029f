# syntax=docker/dockerfile:1
# The Baton worker image (also every other `baton` command; not the lab, `baton-lab`): built with Swift on Debian, run on a slim
# Debian with libpq and librabbitmq only, as a non-root user, healthy when /health/ready answers 200.
#
#   docker build --build-arg BATON_COMMIT=$(git rev-parse --short=12 HEAD) -t baton .
#   docker compose up -d --wait        # PostgreSQL, RabbitMQ, migrate + topology, two workers
#
# docs/operations.md, "Containers", says what runs and how to configure it.

# The compiler the project is tested with here (Swift 6.3.1); the runtime's Debian matches its base.
ARG SWIFT_IMAGE=swift:6.3-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${SWIFT_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq-dev librabbitmq-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The manifest names every target, the tests' and the example's too: SwiftPM wants their folders.
COPY Package.swift ./
COPY Sources Sources
COPY Plugins Plugins
COPY Tests Tests
COPY examples/swift examples/swift
# No .git in the build context (.dockerignore): the commit comes in as an argument (BuildInfoPlugin).
ARG BATON_COMMIT=unknown
RUN BATON_COMMIT="${BATON_COMMIT}" swift build -c release --product baton --static-swift-stdlib \
    && install -D -m 0755 "$(swift build -c release --show-bin-path)/baton" /out/baton

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 librabbitmq4 libcurl4 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin baton
COPY --from=build /out/baton /usr/local/bin/baton
USER 10001:10001
# /metrics, /health/live, /health/ready (BATON_METRICS_PORT).
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${BATON_METRICS_PORT:-9464}/health/ready" >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/baton"]
CMD ["worker"]
