//! Key types and pure cryptography: EIP-712 encoding, Ethereum addresses,
//! signature normalisation and recovery ids. Never touches the HSM or the store.

pub mod eip712;
pub mod eth;
pub mod jwk;
pub mod jws;
pub mod message;
pub mod tx;
