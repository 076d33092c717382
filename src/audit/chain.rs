//! The canonical encoding and the hash chain (see the module doc of
//! [`crate::audit`] for the exact format).

use sha2::{Digest as _, Sha256};

use super::event::NewEvent;

/// `prev_hash` of the first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

const TAG: &[u8; 16] = b"keyward.audit.v1";

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The canonical encoding of event `seq`.
pub fn canonical(seq: u64, e: &NewEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(TAG);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&e.time_ms.to_be_bytes());
    for s in [
        &e.identity,
        &e.action,
        &e.account,
        &e.session,
        &e.request_id,
        &e.decision,
    ] {
        put_str(&mut out, s);
    }
    let n = u32::try_from(e.policies.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for p in &e.policies {
        put_str(&mut out, p);
    }
    for s in [&e.code, &e.digest, &e.signature_ref] {
        put_str(&mut out, s);
    }
    // Added after the first events were chained: absent (not an empty
    // string) when there is none, so older events hash as they did.
    if !e.trace_id.is_empty() {
        put_str(&mut out, &e.trace_id);
    }
    out
}

/// `SHA-256(prev_hash || canonical(seq, e))`.
pub fn link(prev_hash: &[u8; 32], seq: u64, e: &NewEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(canonical(seq, e));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash() {
        let base = NewEvent {
            time_ms: 1,
            identity: "i".into(),
            action: "a".into(),
            account: "acc".into(),
            session: "s".into(),
            request_id: "r".into(),
            decision: "allow".into(),
            policies: vec!["p".into()],
            code: "OK".into(),
            digest: "d".into(),
            signature_ref: "x".into(),
            trace_id: String::new(),
        };
        let h = link(&GENESIS, 1, &base);
        assert_ne!(h, link(&GENESIS, 2, &base));
        assert_ne!(h, link(&[1u8; 32], 1, &base));
        let mut variants = Vec::new();
        for i in 0..12 {
            let mut e = base.clone();
            match i {
                0 => e.time_ms = 2,
                1 => e.identity.push('x'),
                2 => e.action.push('x'),
                3 => e.account.push('x'),
                4 => e.session.push('x'),
                5 => e.request_id.push('x'),
                6 => e.decision = "deny".into(),
                7 => e.policies.push("q".into()),
                8 => e.code.push('x'),
                9 => e.digest.push('x'),
                10 => e.signature_ref.push('x'),
                _ => e.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            }
            variants.push(link(&GENESIS, 1, &e));
        }
        for v in &variants {
            assert_ne!(*v, h);
        }
        // Moving a byte between adjacent fields changes the encoding.
        let mut shifted = base.clone();
        shifted.identity = "ia".into();
        shifted.action = String::new();
        assert_ne!(link(&GENESIS, 1, &shifted), h);
    }

    /// Events chained before trace ids existed keep their hash: an event
    /// without one encodes exactly as version 1 did (no trailing field), and
    /// one with a trace id ends with it.
    #[test]
    fn an_event_without_a_trace_id_encodes_as_before() {
        let e = NewEvent {
            time_ms: 7,
            identity: "spiffe://example.org/admin".into(),
            action: "SignTypedData".into(),
            decision: "allow".into(),
            code: "OK".into(),
            ..NewEvent::default()
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(b"keyward.audit.v1");
        expected.extend_from_slice(&3u64.to_be_bytes());
        expected.extend_from_slice(&7i64.to_be_bytes());
        for s in ["spiffe://example.org/admin", "SignTypedData", "", "", "", "allow"] {
            expected.extend_from_slice(&(s.len() as u32).to_be_bytes());
            expected.extend_from_slice(s.as_bytes());
        }
        expected.extend_from_slice(&0u32.to_be_bytes());
        for s in ["OK", "", ""] {
            expected.extend_from_slice(&(s.len() as u32).to_be_bytes());
            expected.extend_from_slice(s.as_bytes());
        }
        assert_eq!(canonical(3, &e), expected);
        let traced = NewEvent {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            ..e
        };
        let mut with = expected.clone();
        with.extend_from_slice(&32u32.to_be_bytes());
        with.extend_from_slice(b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(canonical(3, &traced), with);
    }
}
