//! Wall-clock time in UTC seconds, the unit every stored time uses.

/// Seconds since the Unix epoch, UTC. A clock set before 1970 reads as 0.
pub fn unix_now() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}
