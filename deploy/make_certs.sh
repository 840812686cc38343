#!/usr/bin/env bash
# Creates what a deployment's `security` section names (services/common/security.py): a CA, the
# suite's internal certificate signed by it (for servers and clients alike), and a shared secret.
#   deploy/make_certs.sh DIR [SERVER_NAME]      # SERVER_NAME: the security.server_name
# Copy DIR to every node (same path), readable by the services' user (uid 10001 in the images).
set -euo pipefail
dir=${1:?usage: make_certs.sh DIR [SERVER_NAME]}
name=${2:-k2serve.internal}
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=k2serve internal CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=$name" -keyout internal.key -out internal.csr \
  2>/dev/null
printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$name" > internal.ext
openssl x509 -req -in internal.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
  -extfile internal.ext -out internal.pem 2>/dev/null
openssl rand -hex 32 > secret
rm -f internal.csr internal.ext ca.srl
chmod 600 ca.key
echo "wrote $dir: ca.pem ca.key internal.pem internal.key secret (keep ca.key off the nodes)"
