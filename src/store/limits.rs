//! Limit counters as pure functions of what is stored, shared by both
//! backends: a token bucket refilled by elapsed time, and a running total that
//! refuses to pass its cap.

/// A token bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens a full bucket holds.
    pub capacity: u64,
    /// Milli-tokens added per second.
    pub refill_milli_per_second: u64,
}

/// Milli-tokens per token.
pub const MILLI: i64 = 1000;

/// Takes one token from a bucket holding `tokens` milli-tokens last updated at
/// `updated_at` (None: a new bucket, full): the new `(tokens, updated_at)`, or
/// None when less than one token is there (nothing changes then).
pub fn take(stored: Option<(i64, i64)>, now: i64, b: Bucket) -> Option<(i64, i64)> {
    let full = i64::try_from(b.capacity)
        .unwrap_or(i64::MAX / MILLI)
        .saturating_mul(MILLI);
    let (tokens, at) = match stored {
        None => (full, now),
        Some((tokens, updated_at)) => {
            // A clock that went back (another replica) refills nothing.
            let elapsed = now.saturating_sub(updated_at).max(0);
            let rate = i64::try_from(b.refill_milli_per_second).unwrap_or(i64::MAX);
            (
                tokens.saturating_add(elapsed.saturating_mul(rate)).min(full),
                now.max(updated_at),
            )
        }
    };
    (tokens >= MILLI).then(|| (tokens - MILLI, at))
}

/// Seconds an empty bucket takes to be full again (None: it never refills).
/// A bucket row untouched for that long holds exactly what a missing row
/// does (a full bucket), so it can be deleted.
pub fn full_after(b: Bucket) -> Option<i64> {
    if b.refill_milli_per_second == 0 {
        return None;
    }
    let full = u128::from(b.capacity).saturating_mul(MILLI as u128);
    let secs = full.div_ceil(u128::from(b.refill_milli_per_second));
    i64::try_from(secs).ok()
}

/// Adds `amount` to `total` unless the sum passes `cap`.
pub fn add(total: u128, amount: u128, cap: u128) -> Option<u128> {
    total.checked_add(amount).filter(|t| *t <= cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_untouched_past_full_after_is_full() {
        let b = Bucket {
            capacity: 3,
            refill_milli_per_second: 700,
        };
        let after = full_after(b).expect("refills");
        assert_eq!(after, 5, "3000 milli-tokens at 700/s: 4.3 s, rounded up");
        // Empty at t=0; at `after` it holds what a new (missing) bucket holds.
        let empty = Some((0, 0));
        assert_eq!(take(empty, after, b), take(None, after, b));
        assert_ne!(take(empty, after - 1, b), take(None, after - 1, b));
        assert_eq!(
            full_after(Bucket {
                capacity: 3,
                refill_milli_per_second: 0
            }),
            None
        );
    }

    #[test]
    fn bucket_empties_and_refills() {
        let b = Bucket {
            capacity: 2,
            refill_milli_per_second: 500,
        };
        let s = take(None, 100, b).expect("full");
        assert_eq!(s, (1000, 100));
        let s = take(Some(s), 100, b).expect("second");
        assert_eq!(take(Some(s), 100, b), None, "empty");
        assert_eq!(take(Some(s), 101, b), None, "half a token after 1 s");
        assert_eq!(take(Some(s), 102, b), Some((0, 102)), "one token after 2 s");
        assert_eq!(
            take(Some((0, 100)), 10_000, b),
            Some((1000, 10_000)),
            "capped at capacity"
        );
        assert_eq!(
            take(Some((1000, 200)), 100, b),
            Some((0, 200)),
            "clock went back: no refill"
        );
    }

    #[test]
    fn totals_stop_at_the_cap() {
        assert_eq!(add(0, 40, 100), Some(40));
        assert_eq!(add(60, 40, 100), Some(100));
        assert_eq!(add(61, 40, 100), None);
        assert_eq!(add(u128::MAX, 1, u128::MAX), None);
    }
}
