#!/usr/bin/env bash
# Regenerates the example's development certificates (never use them outside this example):
# a CA, a server certificate for localhost and a client certificate with a SPIFFE id.
set -euo pipefail
cd "$(dirname "$0")"
days=3650
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days $days \
    -subj "/CN=Weir example CA" -keyout ca-key.pem -out ca.pem 2>/dev/null
issue() { # name subject extensions
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
        -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days $days \
        -extfile <(printf '%s\n' "$3") -out "$1.pem" 2>/dev/null
    rm -f "$1.csr"
}
issue localhost "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue client "/CN=curl" "subjectAltName=URI:spiffe://example.local/ns/demo/sa/curl
extendedKeyUsage=clientAuth"
rm -f ca.srl
