#!/usr/bin/env bash
# The compose file's one-shot init job (in the keyward-init image, as user
# 65532): development certificates when none are mounted, then the SoftHSM
# token, its KEK and issuer keys, and the PostgreSQL schema, through
# softhsm/init-token.sh. Idempotent: a second run keeps everything and exits 0.
#
# The certificates are for trying the compose file on one machine: a CA made
# here (its key stays in the tls volume), a server certificate for the names
# the replicas answer to (keyward, localhost, 127.0.0.1) and one client
# certificate, spiffe://example.org/admin (the admin of policies/clients.toml).
# In production, put your own server.pem, server-key.pem and client-ca.pem in
# the tls volume (or mount them) and this step keeps them.
set -euo pipefail

tls=/etc/keyward/tls
days=30

if [[ ! -e "$tls/server.pem" ]]; then
  umask 077
  cd "$tls"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca-key.pem -out ca.pem -days "$days" -subj "/CN=keyward compose dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  leaf() { # name subject-alt-names extended-key-usage
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout "$1-key.pem" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
      -out "$1.pem" -days "$days" \
      -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' "$2" "$3") \
      2>/dev/null
    rm -f "$1.csr"
  }
  leaf server "DNS:keyward,DNS:localhost,IP:127.0.0.1" serverAuth
  leaf admin "URI:spiffe://example.org/admin" clientAuth
  cp ca.pem client-ca.pem
  chmod 0600 ./*-key.pem
  chmod 0644 ca.pem client-ca.pem server.pem admin.pem
  echo "development certificates written to $tls (CA valid $days days)"
else
  echo "certificates in $tls exist; kept"
fi

exec /opt/keyward/softhsm/init-token.sh \
  --config /etc/keyward/keyward.toml \
  --so-pin-file /run/secrets/so-pin \
  --token-dir /var/lib/keyward/tokens \
  --softhsm-conf /var/lib/keyward/softhsm2.conf \
  --keyward /usr/local/bin/keyward
