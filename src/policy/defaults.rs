//! The default policy set shipped in the binary, and its installation into a
//! home folder on first run (an existing folder is never touched).

use std::path::Path;

use super::PolicyError;

/// The shipped files, relative to the policy folder.
pub const DEFAULT_FILES: [(&str, &str); 9] = [
    ("schema.cedarschema", include_str!("../../policies/schema.cedarschema")),
    ("clients.toml", include_str!("../../policies/clients.toml")),
    ("accounts.cedar", include_str!("../../policies/accounts.cedar")),
    ("signing.cedar", include_str!("../../policies/signing.cedar")),
    ("sessions.cedar", include_str!("../../policies/sessions.cedar")),
    ("operations.cedar", include_str!("../../policies/operations.cedar")),
    ("examples.cedar", include_str!("../../policies/examples.cedar")),
    ("limits.toml", include_str!("../../policies/limits.toml")),
    ("tests/default.toml", include_str!("../../policies/tests/default.toml")),
];

/// Writes the default set into `dir` when `dir` does not exist yet; returns
/// whether it did. An existing folder is left as it is: it holds an
/// operator's policies.
pub fn install_defaults(dir: &Path) -> Result<bool, PolicyError> {
    if dir.exists() {
        return Ok(false);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Read { path, source }
    };
    // Written next to the target and renamed into place, so a crash never
    // leaves a half-written folder that would then be kept as "the operator's".
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".policies-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    for (name, text) in DEFAULT_FILES {
        let path = tmp.path().join(name);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io(p))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    let staged = tmp.keep();
    std::fs::rename(&staged, dir).map_err(io(dir))?;
    Ok(true)
}

/// The shipped default set, parsed and validated (tests, benches, `policy check` of the built-ins).
pub fn default_policies() -> Result<super::Policies, PolicyError> {
    let file = |name: &str, text: &str| (std::path::PathBuf::from(name), text.to_string());
    let mut schema = None;
    let mut clients = None;
    let mut policies = Vec::new();
    let mut limits = None;
    for (name, text) in DEFAULT_FILES {
        match name {
            super::limits::LIMITS_FILE => limits = Some(file(name, text)),
            super::engine::SCHEMA_FILE => schema = Some(file(name, text)),
            super::engine::CLIENTS_FILE => clients = Some(file(name, text)),
            n if n.ends_with(".cedar") => policies.push(file(name, text)),
            _ => {}
        }
    }
    let missing = |what: &str| PolicyError::Invalid {
        path: what.into(),
        reason: "missing from the built-in set".into(),
    };
    let schema = schema.ok_or_else(|| missing(super::engine::SCHEMA_FILE))?;
    let clients = clients.ok_or_else(|| missing(super::engine::CLIENTS_FILE))?;
    super::Policies::from_sources(&schema, &policies, &clients, limits.as_ref())
}
