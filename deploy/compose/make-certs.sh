#!/bin/sh
# Make the TLS files the compose stack mounts from deploy/compose/certs/ (git-ignored):
# a private CA, a certificate for the MQTT broker and one for TimescaleDB (ECDSA P-256:
# quick to make, and what constrained sensor TLS stacks such as mbedTLS handle best).
#
#   deploy/compose/make-certs.sh [OUT_DIR] [EXTRA_DNS_NAME ...]
#
# Add the broker's public name (the one sensors dial) as EXTRA_DNS_NAME. A city with its
# own PKI replaces these files with certificates from it; the file names are the contract.
set -eu
out=${1:-$(dirname "$0")/certs}
[ $# -gt 0 ] && shift
mkdir -p "$out"
umask 077
days=825

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
