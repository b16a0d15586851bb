# edgeloop: one image, one binary (`edgeloop broker`, `edgeloop processor`, …);
# the Kubernetes manifests in k8s/ choose the subcommand with `args`.
#
#   docker build -t edgeloop:0.1.0 .
#
# Not built on the development machine (it has no container engine); see
# docs/kubernetes.md.

# --- builder: Rust plus what the bundled librdkafka build needs -----------
FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make perl pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin edgeloop \
    && cp target/release/edgeloop /edgeloop \
    && strip /edgeloop

# --- runtime: only what the binary links (glibc, libgcc, zlib) -------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 edgeloop \
    && useradd --system --uid 10001 --gid edgeloop --no-create-home --shell /usr/sbin/nologin edgeloop
COPY --from=builder /edgeloop /usr/local/bin/edgeloop
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# MQTT, MQTT over TLS, broker metrics, processor metrics.
EXPOSE 1883 8883 9465 9464
ENTRYPOINT ["/usr/local/bin/edgeloop"]
CMD ["--help"]
