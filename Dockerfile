# syntax=docker/dockerfile:1
# Build:  docker build -t fanout .
# Run:    docker run -p 8088:8088 -v fanout-data:/var/lib/fanout fanout
# Config: mount your own at /etc/fanout/config.toml (listen on 0.0.0.0 inside a container).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/fanout

FROM debian:bookworm-slim
# CA roots for HTTPS destinations (Segment, webhooks).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /var/lib/fanout --shell /usr/sbin/nologin fanout \
 && mkdir -p /var/lib/fanout /etc/fanout \
 && chown fanout:fanout /var/lib/fanout
COPY --from=build /src/target/release/fanout /usr/local/bin/fanout
# The shipped example, adjusted for a container: all interfaces, data in the volume.
COPY config.toml /tmp/config.toml
RUN sed -e 's/^listen = "127.0.0.1:8088"/listen = "0.0.0.0:8088"/' \
        -e 's#^data_dir = "./data"#data_dir = "/var/lib/fanout"#' \
        -e 's#^path = "./data/out/events.jsonl"#path = "/var/lib/fanout/out/events.jsonl"#' \
        /tmp/config.toml > /etc/fanout/config.toml \
 && rm /tmp/config.toml \
 && grep -q '0.0.0.0:8088' /etc/fanout/config.toml
USER fanout
EXPOSE 8088
VOLUME ["/etc/fanout", "/var/lib/fanout"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fanout"]
CMD ["--config", "/etc/fanout/config.toml"]
