# mcp-meter: one image for every process (serve, ingestor, aggregator, migrate).
#   docker build -t mcp-meter .
#   docker run --rm -p 8080:8080 -v "$PWD/examples/config:/etc/mcp-meter:ro" \
#     mcp-meter serve --config /etc/mcp-meter/production.toml --listen 0.0.0.0:8080
#     (three example tenants; try -H 'X-API-Key: acme-ingest-example'. The demo tenant of a
#     bare `serve` listens on loopback only, which a published port cannot reach.)

FROM rust:1-bookworm AS build
WORKDIR /src
# librdkafka and SQLite are built from source by their -sys crates with the image's gcc and make.
COPY . .
RUN cargo build --release --locked --bin mcp-meter \
    && cp target/release/mcp-meter /usr/local/bin/mcp-meter

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/mcp-meter --create-home mcp-meter
COPY --from=build /usr/local/bin/mcp-meter /usr/local/bin/mcp-meter
USER mcp-meter
WORKDIR /var/lib/mcp-meter
ENV MCP_METER_DATA_DIR=/var/lib/mcp-meter/data
EXPOSE 8080 9091
ENTRYPOINT ["mcp-meter"]
CMD ["serve", "--help"]
