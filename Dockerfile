# mailroom: one image, every role (`mailroom api`, `mailroom worker`, ...).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mailroom \
 && cp target/release/mailroom /mailroom

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/mailroom --create-home mailroom
COPY --from=build /mailroom /usr/local/bin/mailroom
USER 10001
WORKDIR /var/lib/mailroom
# Keys and passwords come from the environment or mounted files
# (MAILROOM__SEAL__KEYS_FILE, MAILROOM__REDIS__HASH_KEY_FILE, ...), never
# from the image.
ENTRYPOINT ["mailroom"]
CMD ["--help"]
