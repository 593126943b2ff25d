#!/usr/bin/env bash
# Debian packages the suite runs against: SoftHSM2 (PKCS#11), Chromium (browser tests) and
# Prometheus for promtool (checks and unit-tests deploy/prometheus/keyvault-alerts.yml), curl and
# jq (the README's application section runs them).
set -euo pipefail
need=()
command -v softhsm2-util >/dev/null || need+=(softhsm2)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install these Debian packages first: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
