#!/usr/bin/env python3
"""Generates the <document>.eth_account.json EIP-712 test vectors with eth-account.

Rerun:
    python3 -m pip install eth-account      # if `import eth_account` fails
    python3 tests/data/eip712/stablecoin/gen/gen_eth_account.py [OUT_DIR]

OUT_DIR defaults to the parent of this script's folder. After writing, every
*.ethers.json found next to the outputs is cross-checked: same digest as
eth-account, and its signature recovers (eth-account) to the signer.
"""
import copy
import json
import os
import sys
from importlib.metadata import version

from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import to_checksum_address

OUT_DIR = os.path.abspath(sys.argv[1] if len(sys.argv) > 1
                          else os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
acct = Account.from_key(KEY)
SIGNER = acct.address  # 0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
SPENDER = to_checksum_address("0x70997970C51812dc3A010C7d01b50e0d17dc79C8")
USDC_BASE = to_checksum_address("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
PERMIT2 = to_checksum_address("0x000000000022D473030F116dDEE9F6B43aC78BA3")

DOMAIN_FULL = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
DOMAIN_NO_VERSION = [f for f in DOMAIN_FULL if f["name"] != "version"]

usdc_domain = {"name": "USD Coin", "version": "2", "chainId": 8453, "verifyingContract": USDC_BASE}
permit2_domain = {"name": "Permit2", "chainId": 8453, "verifyingContract": PERMIT2}

EIP3009_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]

DOCS = {
    "eip3009_transfer": {
        "types": {"EIP712Domain": DOMAIN_FULL, "TransferWithAuthorization": EIP3009_FIELDS},
        "primaryType": "TransferWithAuthorization",
        "domain": usdc_domain,
        "message": {
            "from": SIGNER, "to": SPENDER, "value": "2500000", "validAfter": "0",
            "validBefore": "1900000000",
            "nonce": "0x6b657977617264000000000000000000000000000000000000000000000e3009",
        },
    },
    "eip3009_receive": {
        "types": {"EIP712Domain": DOMAIN_FULL, "ReceiveWithAuthorization": EIP3009_FIELDS},
        "primaryType": "ReceiveWithAuthorization",
        "domain": usdc_domain,
        "message": {
            "from": SIGNER, "to": SPENDER, "value": "2500000", "validAfter": "0",
            "validBefore": "1900000000",
            "nonce": "0x6b65797761726400000000000000000000000000000000000000000000a3009b",
        },
    },
    "eip2612_permit": {
        "types": {
            "EIP712Domain": DOMAIN_FULL,
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "primaryType": "Permit",
        "domain": usdc_domain,
        "message": {"owner": SIGNER, "spender": SPENDER, "value": "1000000", "nonce": "0",
                    "deadline": "1900000000"},
    },
    "permit2_transfer_from": {
        "types": {
            "EIP712Domain": DOMAIN_NO_VERSION,
            "PermitTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
            "TokenPermissions": [
                {"name": "token", "type": "address"},
                {"name": "amount", "type": "uint256"},
            ],
        },
        "primaryType": "PermitTransferFrom",
        "domain": permit2_domain,
        "message": {
            "permitted": {"token": USDC_BASE, "amount": "3000000"},
            "spender": SPENDER, "nonce": "7", "deadline": "1900000000",
        },
    },
    "permit2_single": {
        "types": {
            "EIP712Domain": DOMAIN_NO_VERSION,
            "PermitSingle": [
                {"name": "details", "type": "PermitDetails"},
                {"name": "spender", "type": "address"},
                {"name": "sigDeadline", "type": "uint256"},
            ],
            "PermitDetails": [
                {"name": "token", "type": "address"},
                {"name": "amount", "type": "uint160"},
                {"name": "expiration", "type": "uint48"},
                {"name": "nonce", "type": "uint48"},
            ],
        },
        "primaryType": "PermitSingle",
        "domain": permit2_domain,
        "message": {
            "details": {"token": USDC_BASE, "amount": "4000000", "expiration": "1900000000",
                        "nonce": "0"},
            "spender": SPENDER, "sigDeadline": "1900000000",
        },
    },
}


def hx(b):
    h = bytes(b).hex()
    return "0x" + h[2:] if h.startswith("0x") else "0x" + h


def main():
    failures = 0
    src = f"eth-account {version('eth-account')}"
    for name, doc in DOCS.items():
        # encode_typed_data may normalise its input in place: give it a copy.
        signable = encode_typed_data(full_message=copy.deepcopy(doc))
        digest = hx(_hash_eip191_message(signable))
        signed = Account.sign_message(signable, KEY)
        assert hx(signed.message_hash) == digest, name
        sig = hx(signed.signature)
        assert len(sig) == 132 and int(sig[-2:], 16) in (27, 28), (name, sig)
        assert Account.recover_message(signable, signature=signed.signature) == SIGNER, name
        out = {
            "source": src,
            "typed_data": doc,
            "digest": digest,
            "address": SIGNER,
            "signature": sig,
        }
        with open(os.path.join(OUT_DIR, f"{name}.eth_account.json"), "w") as f:
            f.write(json.dumps(out, indent=2) + "\n")
        print(f"{name}: {digest}")

        other = os.path.join(OUT_DIR, f"{name}.ethers.json")
        if os.path.exists(other):
            with open(other) as f:
                o = json.load(f)
            os_ = encode_typed_data(full_message=o["typed_data"])
            od = hx(_hash_eip191_message(os_))
            rec = Account.recover_message(os_, signature=bytes.fromhex(o["signature"][2:]))
            ok = od == o["digest"] == digest and rec == SIGNER and o["address"] == SIGNER
            print(f"  cross-check {name}.ethers.json: digest {'equal' if od == digest else 'DIFFERS'}, "
                  f"recovers {rec} -> {'OK' if ok else 'FAIL'}")
            failures += not ok
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
