//! Ethereum transactions: EIP-1559 (type 2) and legacy EIP-155, built with
//! alloy's consensus types. keyward signs [`Transaction::signing_hash`] with
//! the account's key like any other digest, and [`Transaction::encode_signed`]
//! gives the raw transaction (EIP-2718 encoding) and its hash.

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope, TxLegacy};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Bytes, Signature, TxKind, U256};
use num_bigint::BigUint;

use super::eth::Address;

/// ERC-20 `transfer(address,uint256)`.
pub const ERC20_TRANSFER: [u8; 4] = [0xa9, 0x05, 0x9c, 0xbb];
/// ERC-20 `approve(address,uint256)`.
pub const ERC20_APPROVE: [u8; 4] = [0x09, 0x5e, 0xa7, 0xb3];
/// The token functions that move or allow value: `transfer`, `approve`,
/// `transferFrom(address,address,uint256)`, `increaseAllowance(address,uint256)`
/// and `permit(address,address,uint256,uint256,uint8,bytes32,bytes32)` (EIP-2612).
pub const ERC20_VALUE_FUNCTIONS: [[u8; 4]; 5] = [
    ERC20_TRANSFER,
    ERC20_APPROVE,
    [0x23, 0xb8, 0x72, 0xdd],
    [0x39, 0x50, 0x93, 0x51],
    [0xd5, 0x05, 0xac, 0xcf],
];

/// How the transaction pays for gas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fees {
    /// EIP-1559 (type 2): wei per gas.
    Eip1559 {
        /// `maxFeePerGas`.
        max_fee_per_gas: u128,
        /// `maxPriorityFeePerGas` (at most `max_fee_per_gas`).
        max_priority_fee_per_gas: u128,
    },
    /// Legacy, replay-protected by EIP-155: wei per gas.
    Legacy {
        /// `gasPrice`.
        gas_price: u128,
    },
}

/// A transaction to sign: a call (or a transfer of ether) to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// EIP-155 chain id (never 0).
    pub chain_id: u64,
    /// The account's nonce on that chain.
    pub nonce: u64,
    /// Gas limit.
    pub gas_limit: u64,
    /// Fees.
    pub fees: Fees,
    /// The recipient or contract called. Contract creation is not signed.
    pub to: Address,
    /// Wei, big-endian 256-bit.
    pub value: [u8; 32],
    /// Call data.
    pub data: Vec<u8>,
}

/// An ERC-20 call the transaction makes, read from its call data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erc20Call {
    /// `transfer(to, amount)`.
    Transfer {
        /// Recipient.
        to: Address,
        /// Amount, minor units (256-bit).
        amount: [u8; 32],
    },
    /// `approve(spender, amount)`.
    Approve {
        /// Spender.
        spender: Address,
        /// Allowance, minor units (256-bit).
        amount: [u8; 32],
    },
}

/// A transaction that cannot be signed as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TxError {
    /// The request field at fault.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl Transaction {
    /// Checks what a node would refuse outright: chain id 0, a priority fee
    /// above the fee cap, a gas limit below the 21,000 of any transaction.
    pub fn check(&self) -> Result<(), TxError> {
        let err = |field, reason: &str| {
            Err(TxError {
                field,
                reason: reason.to_string(),
            })
        };
        if self.chain_id == 0 {
            return err("chain_id", "must be an EIP-155 chain id (not 0)");
        }
        if self.gas_limit < 21_000 {
            return err("gas_limit", "below 21000, the cost of any transaction");
        }
        if let Fees::Eip1559 {
            max_fee_per_gas,
            max_priority_fee_per_gas,
        } = self.fees
        {
            if max_priority_fee_per_gas > max_fee_per_gas {
                return err("max_priority_fee_per_gas", "above max_fee_per_gas");
            }
        }
        Ok(())
    }

    fn to_alloy(&self) -> TxAny {
        let to = TxKind::Call(alloy_primitives::Address::from(self.to.0));
        let value = U256::from_be_bytes(self.value);
        let input = Bytes::copy_from_slice(&self.data);
        match self.fees {
            Fees::Eip1559 {
                max_fee_per_gas,
                max_priority_fee_per_gas,
            } => TxAny::Eip1559(TxEip1559 {
                chain_id: self.chain_id,
                nonce: self.nonce,
                gas_limit: self.gas_limit,
                max_fee_per_gas,
                max_priority_fee_per_gas,
                to,
                value,
                access_list: Default::default(),
                input,
            }),
            Fees::Legacy { gas_price } => TxAny::Legacy(TxLegacy {
                chain_id: Some(self.chain_id),
                nonce: self.nonce,
                gas_price,
                gas_limit: self.gas_limit,
                to,
                value,
                input,
            }),
        }
    }

    /// The hash the account signs (for type 2: keccak of `0x02 ‖ rlp(fields)`;
    /// legacy: keccak of the EIP-155 RLP with `chainId, 0, 0`).
    pub fn signing_hash(&self) -> [u8; 32] {
        match self.to_alloy() {
            TxAny::Eip1559(t) => t.signature_hash().0,
            TxAny::Legacy(t) => t.signature_hash().0,
        }
    }

    /// The raw signed transaction (what `eth_sendRawTransaction` takes) and
    /// its hash, from the 65-byte r‖s‖v signature over [`Transaction::signing_hash`].
    pub fn encode_signed(&self, signature: &[u8; 65]) -> Result<(Vec<u8>, [u8; 32]), TxError> {
        let sig = Signature::from_raw_array(signature).map_err(|e| TxError {
            field: "signature",
            reason: e.to_string(),
        })?;
        let envelope: TxEnvelope = match self.to_alloy() {
            TxAny::Eip1559(t) => t.into_signed(sig).into(),
            TxAny::Legacy(t) => t.into_signed(sig).into(),
        };
        Ok((envelope.encoded_2718(), envelope.tx_hash().0))
    }

    /// The most the transaction can cost in gas, wei: the gas limit times
    /// the fee cap (EIP-1559) or the gas price (legacy); `None` above 2^128.
    pub fn max_fee(&self) -> Option<u128> {
        let per_gas = match self.fees {
            Fees::Eip1559 { max_fee_per_gas, .. } => max_fee_per_gas,
            Fees::Legacy { gas_price } => gas_price,
        };
        u128::from(self.gas_limit).checked_mul(per_gas)
    }

    /// The first four bytes of the call data, if there are four.
    pub fn selector(&self) -> Option<[u8; 4]> {
        self.data.get(..4).and_then(|s| s.try_into().ok())
    }

    /// The value, in wei.
    pub fn value(&self) -> BigUint {
        BigUint::from_bytes_be(&self.value)
    }

    /// The ERC-20 `transfer` or `approve` the call data encodes, if exactly
    /// one (selector and two ABI words, the address word's top 12 bytes zero).
    pub fn erc20_call(&self) -> Option<Erc20Call> {
        let selector = self.selector()?;
        if self.data.len() != 4 + 64 || self.data[4..16].iter().any(|b| *b != 0) {
            return None;
        }
        let mut address = [0u8; 20];
        address.copy_from_slice(&self.data[16..36]);
        let mut amount = [0u8; 32];
        amount.copy_from_slice(&self.data[36..68]);
        match selector {
            ERC20_TRANSFER => Some(Erc20Call::Transfer {
                to: Address(address),
                amount,
            }),
            ERC20_APPROVE => Some(Erc20Call::Approve {
                spender: Address(address),
                amount,
            }),
            _ => None,
        }
    }
}

enum TxAny {
    Eip1559(TxEip1559),
    Legacy(TxLegacy),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::eth::{recover_address, sign_digest};

    const KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const TO: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

    fn value(v: u128) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[16..].copy_from_slice(&v.to_be_bytes());
        out
    }

    /// The raw transactions and hashes Python's eth-account 0.14 gives for the
    /// same key and fields (`Account.sign_transaction`; RFC 6979 on both sides).
    #[test]
    fn signs_as_eth_account_does() {
        let key = k256::ecdsa::SigningKey::from_slice(&hex::decode(KEY).expect("hex")).expect("key");
        let to = Address::parse(TO).expect("to");
        let cases = [
            (
                Transaction {
                    chain_id: 1,
                    nonce: 7,
                    gas_limit: 22_000,
                    fees: Fees::Eip1559 {
                        max_fee_per_gas: 30_000_000_000,
                        max_priority_fee_per_gas: 2_000_000_000,
                    },
                    to,
                    value: value(1_000_000_000_000_000),
                    data: vec![0xde, 0xad, 0xbe, 0xef],
                },
                "02f876010784773594008506fc23ac008255f09470997970c51812dc3a010c7d01b50e0d17dc79c887038d7ea4c6800084deadbeefc001a05ebfc51c42b32dc76e934a90e727fb8b40d9d30c32540bece4375be973923535a056a8db22651544e30172736db06690a84c4e2fc5ae99b02eb89e3dc531f93e57",
                "46526f0d2bcefe39e2e9d81bd3ce832954cf36b301ecdd5809e22e98b933c510",
            ),
            (
                Transaction {
                    chain_id: 1,
                    nonce: 8,
                    gas_limit: 21_000,
                    fees: Fees::Legacy {
                        gas_price: 20_000_000_000,
                    },
                    to,
                    value: value(12345),
                    data: vec![],
                },
                "f866088504a817c8008252089470997970c51812dc3a010c7d01b50e0d17dc79c88230398026a008490ffb060bf92437f8736b36c6ec8d240a9fa8bd1ff67f0e5cf5fe8f0402afa069eb5f4fbc273abf6497fb9e59430ab17fdfc13cbe8318434001f54cda24f2f6",
                "1960e36e948f199ee39b86778306e739844cf1afc4b4a826ed30a790f77f128e",
            ),
        ];
        for (tx, raw, hash) in cases {
            tx.check().expect("valid");
            let digest = tx.signing_hash();
            let sig = sign_digest(&key, &digest).expect("sign");
            assert_eq!(
                recover_address(&digest, &sig).expect("recovers").to_checksum(),
                "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
            );
            let (got_raw, got_hash) = tx.encode_signed(&sig).expect("encode");
            assert_eq!(hex::encode(got_raw), raw);
            assert_eq!(hex::encode(got_hash), hash);
        }
    }

    #[test]
    fn reads_erc20_calls_exactly() {
        let mut data = ERC20_TRANSFER.to_vec();
        data.extend_from_slice(&[0u8; 12]);
        data.extend_from_slice(&[0x22; 20]);
        data.extend_from_slice(&value(5));
        let tx = Transaction {
            chain_id: 8453,
            nonce: 0,
            gas_limit: 60_000,
            fees: Fees::Legacy { gas_price: 1 },
            to: Address([0x83; 20]),
            value: [0; 32],
            data: data.clone(),
        };
        assert_eq!(
            tx.erc20_call(),
            Some(Erc20Call::Transfer {
                to: Address([0x22; 20]),
                amount: value(5)
            })
        );
        let mut approve = tx.clone();
        approve.data[..4].copy_from_slice(&ERC20_APPROVE);
        assert!(matches!(approve.erc20_call(), Some(Erc20Call::Approve { .. })));
        // Dirty address padding, extra bytes or another selector: not an ERC-20 call.
        let mut dirty = tx.clone();
        dirty.data[4] = 1;
        assert_eq!(dirty.erc20_call(), None);
        let mut longer = tx.clone();
        longer.data.push(0);
        assert_eq!(longer.erc20_call(), None);
        let mut other = tx;
        other.data[..4].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(other.erc20_call(), None);
    }
}
