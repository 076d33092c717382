//! Export, archive and read back: events as JSON Lines (one event per
//! line), checkpoints in a sibling file `<FILE>.checkpoints.jsonl`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::checkpoint::read_range;
use super::event::Event;
use super::store::Checkpoint;
use super::AuditError;
use crate::store::Store;

/// The checkpoints file that goes with an export or archive.
pub fn checkpoints_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".checkpoints.jsonl");
    PathBuf::from(s)
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> AuditError {
    AuditError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// One event as a JSON line (no trailing newline).
pub fn event_line(e: &Event) -> Result<String, AuditError> {
    serde_json::to_string(e).map_err(|e| AuditError::Invalid(e.to_string()))
}

/// Writes the events with `seq > since` (through `through`, if given) to
/// `out`, one per line; returns how many.
pub async fn export<W: std::io::Write>(
    store: &dyn Store,
    since: u64,
    through: Option<u64>,
    out: &mut W,
) -> Result<u64, AuditError> {
    let mut after = since;
    let mut n = 0;
    loop {
        let page = store.audit().events_after(after, 1000).await?;
        let Some(end) = page.last().map(|e| e.seq) else {
            break;
        };
        for e in page.iter().filter(|e| through.is_none_or(|t| e.seq <= t)) {
            writeln!(out, "{}", event_line(e)?).map_err(|e| AuditError::Invalid(e.to_string()))?;
            n += 1;
        }
        if through.is_some_and(|t| end >= t) {
            break;
        }
        after = end;
    }
    Ok(n)
}

/// Writes `items` as JSON lines to a new file (mode 0600); fails if it exists.
fn write_lines<T: serde::Serialize>(path: &Path, items: &[T]) -> Result<(), AuditError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    let mut buf = Vec::new();
    for i in items {
        serde_json::to_writer(&mut buf, i).map_err(|e| file_err(path, e))?;
        buf.push(b'\n');
    }
    f.write_all(&buf).map_err(|e| file_err(path, e))?;
    f.sync_all().map_err(|e| file_err(path, e))
}

/// Writes events `base+1..=through` and their checkpoints to `out` and its
/// checkpoints file, syncs both, then prunes them from the store.
/// `through` must be the end of a checkpoint, so that the archive verifies
/// on its own and no checkpoint spans the cut. Returns how many events.
pub async fn archive(store: &dyn Store, through: u64, out: &Path) -> Result<u64, AuditError> {
    let audit = store.audit();
    let head = audit.audit_head().await?;
    let checkpoints: Vec<Checkpoint> = audit
        .checkpoints()
        .await?
        .into_iter()
        .filter(|c| c.last_seq <= through)
        .collect();
    if through <= head.base_seq || !checkpoints.iter().any(|c| c.last_seq == through) {
        return Err(AuditError::Invalid(format!(
            "--through {through} is not the last event of a checkpoint after the last archived event {}",
            head.base_seq
        )));
    }
    let events = read_range(store, head.base_seq + 1, through).await?;
    if events.len() as u64 != through - head.base_seq {
        return Err(AuditError::Invalid(format!(
            "events {}..={through} are not all in the store",
            head.base_seq + 1
        )));
    }
    write_lines(out, &events)?;
    write_lines(&checkpoints_path(out), &checkpoints)?;
    audit.prune_events(through).await?;
    Ok(events.len() as u64)
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| AuditError::Line {
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Reads an export or archive and its checkpoints file (if present).
pub fn read_export(path: &Path) -> Result<(Vec<Event>, Vec<Checkpoint>), AuditError> {
    let events = read_lines(path)?;
    let cp = checkpoints_path(path);
    let checkpoints = if cp.exists() { read_lines(&cp)? } else { Vec::new() };
    Ok((events, checkpoints))
}
