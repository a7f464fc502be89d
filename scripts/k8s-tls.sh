#!/usr/bin/env bash
# Certificates for the prod overlay's TLS (k8s/overlays/prod/tls.yaml, k8s/README.md "TLS"):
# a private CA and, per gRPC service, a cert-manager-style Secret `<service>-tls` (tls.crt,
# tls.key, ca.crt). Every certificate is for server and client auth (mutual TLS), names the
# Service (<svc>, <svc>.<ns>, <svc>.<ns>.svc, <svc>.<ns>.svc.cluster.local) and 127.0.0.1 (the
# exec probes in the pod dial it).
#
#   bash scripts/k8s-tls.sh                       writes var/k8s-tls/<service>/{tls.crt,tls.key,ca.crt}
#   APPLY=1 bash scripts/k8s-tls.sh               ... and creates/updates the Secrets with kubectl
#   GATEWAY_DNS=chat.example.com,api.example.com  extra names on the gateway's certificate (what
#                                                 outside callers dial; they must trust ca.crt)
# Other settings: OUT (directory), NAMESPACE (colloquy), DAYS (365), CA_DAYS (3650). An existing
# CA in $OUT is reused, so rerunning renews the service certificates under the same CA; then
# `kubectl -n colloquy rollout restart statefulset` (the services read the files at start).
# cert-manager does the same with a CA Issuer and one Certificate per service (README).
set -euo pipefail
cd "$(dirname "$0")/.."

readonly SERVICES=(gateway tokenizer moderation prompt feedback conversation web rlhf)
OUT=${OUT:-var/k8s-tls}
NAMESPACE=${NAMESPACE:-colloquy}
DAYS=${DAYS:-365}
CA_DAYS=${CA_DAYS:-3650}
KUBECTL=${KUBECTL:-kubectl}

command -v openssl >/dev/null || { echo "k8s-tls: openssl not found" >&2; exit 1; }
mkdir -p "$OUT"
umask 077

if [ ! -s "$OUT/ca.key" ] || [ ! -s "$OUT/ca.crt" ]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -days "$CA_DAYS" -subj "/O=Colloquy/CN=colloquy-internal-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

for svc in "${SERVICES[@]}"; do
  dir="$OUT/$svc"
  mkdir -p "$dir"
  sans="DNS:$svc,DNS:$svc.$NAMESPACE,DNS:$svc.$NAMESPACE.svc,DNS:$svc.$NAMESPACE.svc.cluster.local,IP:127.0.0.1"
  if [ "$svc" = gateway ] && [ -n "${GATEWAY_DNS:-}" ]; then
    IFS=, read -r -a extra <<<"$GATEWAY_DNS"
    for name in "${extra[@]}"; do sans+=",DNS:$name"; done
  fi
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" -subj "/O=Colloquy/CN=$svc" 2>/dev/null
  printf '%s\n' "subjectAltName=$sans" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" >"$dir/ext.cnf"
  openssl x509 -req -sha256 -in "$dir/tls.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -days "$DAYS" -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
  cp "$OUT/ca.crt" "$dir/ca.crt"
  rm -f "$dir/tls.csr" "$dir/ext.cnf"
  echo "k8s-tls: $dir ($sans)"
  if [ "${APPLY:-0}" = 1 ]; then
    "$KUBECTL" -n "$NAMESPACE" create secret generic "$svc-tls" --type=kubernetes.io/tls \
      --from-file=tls.crt="$dir/tls.crt" --from-file=tls.key="$dir/tls.key" --from-file=ca.crt="$dir/ca.crt" \
      --dry-run=client -o yaml | "$KUBECTL" apply -f -
  fi
done
echo "k8s-tls: the CA's key is $OUT/ca.key: keep it out of the cluster (and of git: var/ is ignored)"
