#!/usr/bin/env python3
"""Independent EIP-712 cross-check: print the eth_signTypedData_v4 signing hash of a document.

Usage: eip712_digest.py FILE.json
FILE holds either a typed-data document ({"types", "primaryType", "domain", "message"})
or a fixture {"typed_data": {...}, ...}. Prints the 0x-prefixed keccak256 digest
(0x19 0x01 || domainSeparator || hashStruct(message)) as computed by eth-account
(pip install eth-account). Exits non-zero if eth-account refuses the document.
"""
import json
import sys

from eth_account.messages import _hash_eip191_message, encode_typed_data


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    if "typed_data" in doc:
        doc = doc["typed_data"]
    signable = encode_typed_data(full_message=doc)
    print("0x" + _hash_eip191_message(signable).hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
