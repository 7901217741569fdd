#!/usr/bin/env bash
# Regenerates the example's development certificates (never use them outside this example):
# the mesh CA (the trust bundle) and a workload certificate for each of productpage and
# reviews, whose only name is its SPIFFE id.
set -euo pipefail
cd "$(dirname "$0")"
days=3650
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days $days \
    -subj "/CN=Weir example mesh CA" -keyout bundle-key.pem -out bundle.pem 2>/dev/null
workload() { # name
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=mesh.local" \
        -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA bundle.pem -CAkey bundle-key.pem -CAcreateserial \
        -days $days -out "$1.pem" 2>/dev/null -extfile <(printf '%s\n' \
        "subjectAltName=URI:spiffe://mesh.local/ns/default/sa/$1" \
        "extendedKeyUsage=serverAuth,clientAuth")
    rm -f "$1.csr"
}
workload productpage
workload reviews
rm -f bundle.srl
