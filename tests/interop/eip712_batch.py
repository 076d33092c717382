#!/usr/bin/env python3
"""Independent EIP-712 cross-check over a batch: one signing hash per typed-data document.

Usage: eip712_batch.py < DOCS.jsonl

Reads JSON Lines from stdin, each a typed-data document ({"types", "primaryType",
"domain", "message"}), and prints exactly one line per input line, in order:
  0x<64 hex digits>     the eth_signTypedData_v4 signing hash
                        (keccak256(0x19 0x01 || domainSeparator || hashStruct(message)))
                        as computed by eth-account (pip install eth-account), the same
                        computation as eip712_digest.py;
  error: <reason>       when eth-account (or the JSON parser) refuses the document.
One process serves the whole batch, so a test can check hundreds of documents at once.
Exits non-zero only if eth-account itself cannot be imported.
"""
import json
import sys

from eth_account.messages import _hash_eip191_message, encode_typed_data


def digest(line: str) -> str:
    try:
        doc = json.loads(line)
        signable = encode_typed_data(full_message=doc)
        return "0x" + _hash_eip191_message(signable).hex()
    except Exception as e:  # noqa: BLE001 - every refusal becomes one "error:" line
        reason = f"{type(e).__name__}: {e}"
        return "error: " + " ".join(reason.split())


def main() -> int:
    out = sys.stdout
    # Split on b"\n" only: a document may hold raw U+2028 or other characters that
    # text-mode line splitting could treat as line ends.
    for raw in sys.stdin.buffer:
        line = raw.rstrip(b"\r\n")
        if not line:
            out.write("error: empty line\n")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.write("error: " + " ".join(f"UnicodeDecodeError: {e}".split()) + "\n")
            continue
        out.write(digest(text) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
