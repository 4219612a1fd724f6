# audit-ledger: multi-stage build, non-root runtime, the ledger on a volume.
#   docker build -t audit-ledger .
#   docker run -v ledger-data:/data -v $PWD/config:/config:ro -p 50051:50051 audit-ledger
# The server refuses to listen beyond loopback without authentication and TLS: put an
# auth file and certificates in /config and name them in /config/audit-ledger.toml
# (see docs/OPERATIONS.md).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/audit-ledger

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data ledger \
    && mkdir -p /data /config && chown ledger /data
COPY --from=build /src/target/release/audit-ledger /usr/local/bin/audit-ledger
USER ledger
ENV AUDIT_LEDGER_DATA_DIR=/data \
    AUDIT_LEDGER_LISTEN=0.0.0.0:50051 \
    AUDIT_LEDGER_CONFIG=/config/audit-ledger.toml \
    AUDIT_LEDGER_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["audit-ledger"]
CMD ["serve"]
