//! Printing results: one JSON object with --json, a short summary without.

/// 0x-prefixed lowercase hex.
pub fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Prints `value` as one JSON line, or `human` lines.
pub fn emit(json: bool, value: &serde_json::Value, human: &[(&str, String)]) {
    if json {
        println!("{value}");
    } else {
        let width = human.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in human {
            println!("{k:width$}  {v}");
        }
    }
}
