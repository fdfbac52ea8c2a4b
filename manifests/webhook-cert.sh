#!/usr/bin/env bash
# Makes the injector's serving certificate for the plain manifests (manifests/meshlet.yaml):
# a CA and a certificate for meshlet-injector.<namespace>.svc, stored in the Secret
# meshlet-injector-tls, and the CA patched into the MutatingWebhookConfiguration's caBundle.
# The private keys never leave the cluster: they are written to a temporary directory that is
# removed on exit. Run it again to rotate (the injector re-reads its certificate by itself).
#
#   kubectl apply -f manifests/meshlet.yaml && manifests/webhook-cert.sh
#
# Needs kubectl (current context) and openssl. NAMESPACE (default meshlet-system) and DAYS
# (default 3650) can be set in the environment.
set -euo pipefail

NAMESPACE=${NAMESPACE:-meshlet-system}
DAYS=${DAYS:-3650}
NAME=meshlet-injector
KUBECTL=${KUBECTL:-kubectl}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$DAYS" \
    -subj "/CN=$NAME-ca" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$NAME.$NAMESPACE.svc" -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
    "$NAME" "$NAME" "$NAMESPACE" "$NAME" "$NAMESPACE" "$NAME" "$NAMESPACE" >ext.cnf
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
    -extfile ext.cnf -out tls.crt 2>/dev/null

"$KUBECTL" -n "$NAMESPACE" create secret generic "$NAME-tls" --type=kubernetes.io/tls \
    --from-file=tls.crt --from-file=tls.key --from-file=ca.crt \
    --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
ca=$(base64 <ca.crt | tr -d '\n')
"$KUBECTL" patch mutatingwebhookconfiguration "$NAME" --type=json \
    -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"}]" >/dev/null
echo "webhook-cert.sh: Secret $NAMESPACE/$NAME-tls written; caBundle of $NAME patched"
