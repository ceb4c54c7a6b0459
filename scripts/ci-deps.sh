#!/usr/bin/env bash
# System packages needed to build waterbear-stream (rdkafka with cmake-build,
# ssl and gssapi) and to run the test Kafka broker (scripts/kafka.sh).
# Idempotent: apt-get runs only when something is missing.
#
#   cmake, build-essential, pkg-config  build librdkafka from source (rdkafka "cmake-build")
#   libssl-dev                          rdkafka "ssl": TLS and SASL SCRAM/OAUTHBEARER
#   libsasl2-dev                        rdkafka "gssapi": SASL GSSAPI (Kerberos) via Cyrus SASL
#   zlib1g-dev                          rdkafka "libz" (gzip compression)
#   libcurl4-openssl-dev                rdkafka "curl": SASL OAUTHBEARER OIDC; also librdkafka
#                                       2.12 with ssl does not compile without curl
#   openjdk-17-jre-headless, maven      scripts/kafka.sh fetches and runs Apache Kafka 4.x
#   unzip                               scripts/kafka.sh inspects the fetched jars
set -euo pipefail

pkgs=(cmake build-essential pkg-config libssl-dev libsasl2-dev zlib1g-dev libcurl4-openssl-dev
      openjdk-17-jre-headless maven unzip)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
    echo "ci-deps.sh: all present" >&2
    exit 0
fi

echo "ci-deps.sh: installing ${missing[*]}" >&2
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "ci-deps.sh: done" >&2
