#!/bin/sh
# Make the TLS files the compose stack mounts from deploy/compose/certs/ (git-ignored):
# a private CA, a certificate for the MQTT broker and one for TimescaleDB (ECDSA P-256:
# quick to make, and what constrained sensor TLS stacks such as mbedTLS handle best).
#
#   deploy/compose/make-certs.sh [OUT_DIR] [EXTRA_DNS_NAME ...]
#   deploy/compose/make-certs.sh OUT_DIR device NAME     # a device's client certificate
#
# Add the broker's public name (the one sensors dial) as EXTRA_DNS_NAME. A city with its
# own PKI replaces these files with certificates from it; the file names are the contract.
#
# `device NAME` issues OUT_DIR/devices/NAME.crt and .key, signed by the same CA, for the
# broker's mutual-TLS listener: NAME (the certificate's CN) is the device's identity, its
# sensor id, gateway id or bridge name (README, "Provisioning a device"). Install both
# files and ca.crt on the device; keep no copy of the key.
set -eu
out=${1:-$(dirname "$0")/certs}
[ $# -gt 0 ] && shift
mkdir -p "$out"
umask 077
days=825

if [ "${1:-}" = "device" ]; then
  name=${2:?usage: make-certs.sh OUT_DIR device NAME}
  case "$name" in
    *[!A-Za-z0-9_.-]*|[!A-Za-z0-9]*) echo "bad device name: $name" >&2; exit 2 ;;
  esac
  [ -f "$out/ca.key" ] || { echo "no CA in $out: run make-certs.sh $out first" >&2; exit 2; }
  mkdir -p "$out/devices"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -subj "/O=cityops/CN=$name" -keyout "$out/devices/$name.key" \
    -out "$out/devices/$name.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > "$out/devices/$name.ext"
  openssl x509 -req -in "$out/devices/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -days "$days" -sha256 -extfile "$out/devices/$name.ext" \
    -out "$out/devices/$name.crt" 2>/dev/null
  rm -f "$out/devices/$name.csr" "$out/devices/$name.ext"
  echo "device certificate in $out/devices: $name.crt/.key (CN=$name)"
  exit 0
fi

extra=""
for name in "$@"; do extra="$extra,DNS:$name"; done

if [ ! -f "$out/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 \
    -subj "/O=cityops/CN=cityops private CA" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi

issue() {  # issue NAME SUBJECT_ALT_NAMES
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -subj "/O=cityops/CN=$1" \
    -keyout "$out/$1.key" -out "$out/$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$2" > "$out/$1.ext"
  openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -days "$days" -sha256 -extfile "$out/$1.ext" -out "$out/$1.crt" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
}

issue server "DNS:mosquitto,DNS:mosquitto.cityops.svc,DNS:mosquitto.cityops.svc.cluster.local,DNS:localhost,IP:127.0.0.1$extra"
issue db "DNS:timescaledb,DNS:timescaledb.cityops.svc,DNS:localhost,IP:127.0.0.1"
chmod 0644 "$out/ca.crt" "$out/server.crt" "$out/db.crt"
echo "certificates in $out: ca.crt, server.crt/.key (mosquitto), db.crt/.key (timescaledb)"
