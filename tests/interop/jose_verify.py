#!/usr/bin/env python3
"""Independent JWS verification with Python's joserfc (not keyward's code).

Usage: jose_verify.py JWKS_FILE [COMPACT_JWS]   (the token is read from stdin if not given)

Verifies the compact JWS with the key of the JWKS whose kid matches the header's kid (algorithms
EdDSA, ES256, ES256K only) and prints the claims as JSON. Exits 1 with a reason otherwise.
"""
import base64
import json
import sys

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

ALGORITHMS = ["EdDSA", "ES256", "ES256K"]


def fail(reason):
    print(f"jose_verify: {reason}", file=sys.stderr)
    sys.exit(1)


def header_of(token):
    part = token.split(".")[0]
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, TypeError) as e:
        fail(f"unreadable header: {e}")


def main():
    if len(sys.argv) not in (2, 3):
        fail("usage: jose_verify.py JWKS_FILE [COMPACT_JWS]")
    with open(sys.argv[1], encoding="utf-8") as f:
        jwks = json.load(f)
    token = (sys.argv[2] if len(sys.argv) == 3 else sys.stdin.read()).strip()
    header = header_of(token)
    kid = header.get("kid")
    if not isinstance(kid, str):
        fail("header has no kid")
    matches = [k for k in jwks.get("keys", []) if k.get("kid") == kid]
    if len(matches) != 1:
        fail(f"{len(matches)} keys with kid {kid!r}")
    try:
        key = JWKRegistry.import_key(matches[0])
        obj = jws.deserialize_compact(token, key, algorithms=ALGORITHMS)
    except JoseError as e:
        fail(f"verification failed: {e.__class__.__name__}: {e}")
    if obj.protected.get("alg") != matches[0].get("alg"):
        fail(f"header alg {obj.protected.get('alg')!r} is not the key's alg {matches[0].get('alg')!r}")
    try:
        claims = json.loads(obj.payload)
    except ValueError as e:
        fail(f"payload is not JSON: {e}")
    print(json.dumps(claims, sort_keys=True, separators=(",", ":")))


if __name__ == "__main__":
    main()
