#!/usr/bin/env python3
"""Decode a raw signed Ethereum transaction with eth-account (independent of keyward).

Usage: tx_decode.py 0x<raw transaction>
Prints one JSON object: the sender eth-account recovers, the transaction type
(0 legacy, 2 EIP-1559) and its fields (integers as decimal strings, bytes and
addresses as 0x hex).
"""
import json
import sys

import rlp
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes


def main() -> None:
    raw = bytes.fromhex(sys.argv[1].removeprefix("0x"))
    out = {"sender": Account.recover_transaction(raw), "hash": "0x" + keccak(raw).hex()}
    if raw[0] >= 0xC0:
        nonce, gas_price, gas, to, value, data, v, _r, _s = rlp.decode(raw)
        i = lambda b: int.from_bytes(b, "big")
        out.update(
            type=0,
            nonce=i(nonce),
            gasPrice=i(gas_price),
            gas=i(gas),
            to=to_checksum_address(to),
            value=i(value),
            data="0x" + data.hex(),
            chainId=(i(v) - 35) // 2,
        )
    else:
        tx = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
        out.update(
            type=tx["type"],
            nonce=tx["nonce"],
            maxFeePerGas=tx["maxFeePerGas"],
            maxPriorityFeePerGas=tx["maxPriorityFeePerGas"],
            gas=tx["gas"],
            to=to_checksum_address(tx["to"]),
            value=tx["value"],
            data="0x" + bytes(tx["data"]).hex(),
            chainId=tx["chainId"],
        )
    print(json.dumps({k: (str(v) if isinstance(v, int) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
