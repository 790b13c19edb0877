# syntax=docker/dockerfile:1
#
# cardgate gateway image.
#
#   docker build -t cardgate .
#   docker run --rm -p 8080:8080 \
#     -e CARDGATE_REDIS_URL=redis://redis:6379/ \
#     -e CARDGATE_DATABASE_URL=postgres://cardgate:secret@postgres:5432/cardgate \
#     -e CARDGATE_MASTER_KEY=<64 hex chars> -e CARDGATE_JWT_SECRET=<secret> \
#     -e CARDGATE_BOOTSTRAP_ADMIN=admin:<password> \
#     cardgate
#
# Nothing but the binary is needed at run time: config/default.toml is compiled in
# (include_str! in src/config.rs) and the migrations are embedded (refinery's
# embed_migrations! in src/store/pg.rs) and applied at start-up. An override file can
# be mounted and named in CARDGATE_CONFIG.

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# 1. Dependencies only, against stub sources, so that this layer is reused until
#    Cargo.toml or Cargo.lock change. The workspace's other members (loadtests, client)
#    and the declared benches must exist for Cargo to load the manifests; they are not built.
COPY Cargo.toml Cargo.lock ./
COPY loadtests/Cargo.toml loadtests/Cargo.toml
COPY client/Cargo.toml client/Cargo.toml
RUN mkdir -p src benches loadtests/src client/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs client/src/lib.rs \
    && echo 'fn main() {}' > loadtests/src/main.rs \
    && echo 'fn main() {}' > client/src/main.rs \
    && echo 'fn main() {}' > benches/signing.rs \
    && echo 'fn main() {}' > benches/order_path.rs \
    && cargo build --release --locked --bin cardgate \
    && rm -rf src

# 2. The real sources. config/ and migrations/ are compiled into the binary.
COPY src src
COPY config config
COPY migrations migrations
# COPY keeps the files' own mtimes, which can be older than the stub build: touch the
# crate roots so that Cargo rebuilds cardgate itself instead of keeping the stub.
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked --bin cardgate \
    && cp target/release/cardgate /usr/local/bin/cardgate \
    && /usr/local/bin/cardgate --help > /dev/null

# ---------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: the system trust store, for anything TLS that uses it (the callback
# client, reqwest with rustls, ships its own webpki roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cardgate \
    && useradd --system --uid 10001 --gid cardgate --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cardgate

COPY --from=build /usr/local/bin/cardgate /usr/local/bin/cardgate

ENV CARDGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER 10001:10001

# /healthz: the process is up. (/readyz, which also needs Redis and Postgres, is for the
# load balancer, not for restarting the container.) `cardgate healthcheck` asks the port
# named in CARDGATE_LISTEN, with no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/cardgate", "healthcheck"]

# SIGTERM: stop accepting, finish in-flight requests (http.shutdown_grace_ms, 30 s),
# commit every pending fulfilment (orders.drain_timeout_ms, 30 s), exit 0. Give the
# container that long: `docker stop -t 70` / compose `stop_grace_period: 70s`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cardgate"]
# Or `reconcile` / `rebuild` for the one-off commands.
CMD ["serve"]
