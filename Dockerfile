# syntax=docker/dockerfile:1
# The Signet control plane image. It also carries the `signet` CLI (key generation, offline
# verification) and the demo upstream, so docker-compose.yml builds one image for both.
#   docker build -t signet .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        --bin signet-control-plane --bin signet --bin demo-upstream

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data signet \
    && mkdir /data && chown signet /data
COPY --from=build /src/target/release/signet-control-plane \
                  /src/target/release/signet \
                  /src/target/release/demo-upstream /usr/local/bin/
USER signet
WORKDIR /data
# Configuration is the environment (control-plane/README.md); these only suit a container:
# the public and internal APIs on every interface (the admin API stays on loopback unless
# SP_ADMIN_BIND says), and the SQLite file (when SP_STORAGE=sqlite) in the volume.
ENV SP_BIND=0.0.0.0 \
    PORT=8088 \
    SP_INTERNAL_PORT=8090 \
    SP_ADMIN_PORT=8091 \
    SP_DB_PATH=/data/signet.db
EXPOSE 8088 8090
VOLUME ["/data"]
ENTRYPOINT ["signet-control-plane"]
