#!/usr/bin/env bash
# `kind = "http"` into the `ack` baseline (../shared/bench/README): bench/delivery.sh with
# KIND=http, i.e. each event rendered through a 7-field mapping and batched in an
# `events` envelope. Reports events/s and fanout CPU s for the drain, to compare with
# KIND=webhook (the message as stored, no mapping).
# Usage: bench/http_kind.sh   (same environment knobs as bench/delivery.sh)
# Smoke run: MESSAGES=20000 ROUND=2s bench/http_kind.sh
set -euo pipefail
KIND=http exec "$(dirname "$0")/delivery.sh" "$@"
