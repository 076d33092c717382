"""Recover the signer of an EIP-712 document with eth-account (independent of keyward).

Usage: eip712_recover.py 0x<65-byte signature>  < typed_data.json
Prints the EIP-55 address that signed it.
"""
import json
import sys

from eth_account import Account
from eth_account.messages import encode_typed_data


def main() -> None:
    doc = json.load(sys.stdin)
    msg = encode_typed_data(full_message=doc)
    print(Account.recover_message(msg, signature=sys.argv[1]))


if __name__ == "__main__":
    main()
