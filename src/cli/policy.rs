//! `keyward policy`: check a policy set, run request tables against it, and
//! explain decisions. Works on files only: no daemon, no HSM.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;

use crate::policy::table::Table;
use crate::policy::Policies;

/// `keyward policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Parse and validate a policy folder against its schema.
    Check {
        /// The policy folder.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
    },
    /// Run request tables (TOML) and compare each decision with the expected one.
    Test {
        /// Table files, e.g. policies/tests/*.toml.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The policy folder.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
    },
    /// Print the decision for each request of a file, with the policies that decided.
    Explain {
        /// A table file (its `expect` lines are ignored).
        #[arg(long)]
        request: PathBuf,
        /// The policy folder.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
    },
}

fn load(dir: &Path) -> anyhow::Result<Policies> {
    Policies::load_dir(dir).with_context(|| format!("policy set {} is not usable", dir.display()))
}

/// Runs a policy command; Ok(false) when tests failed.
pub fn policy(cmd: PolicyCmd) -> anyhow::Result<bool> {
    match cmd {
        PolicyCmd::Check { dir } => {
            let p = load(&dir)?;
            println!(
                "ok: {} policies in {} validate against the schema",
                p.len(),
                dir.display()
            );
            Ok(true)
        }
        PolicyCmd::Test { files, dir } => {
            let p = load(&dir)?;
            let (mut passed, mut failed) = (0usize, 0usize);
            for file in &files {
                let table = Table::load(file)?;
                for o in table.run(file, &p)? {
                    match &o.failure {
                        None => {
                            passed += 1;
                            println!("ok    {}: {}", file.display(), o.name);
                        }
                        Some(why) => {
                            failed += 1;
                            println!("FAIL  {}: {}: {why}", file.display(), o.name);
                        }
                    }
                }
            }
            println!("{passed} passed, {failed} failed");
            Ok(failed == 0)
        }
        PolicyCmd::Explain { request, dir } => {
            let p = load(&dir)?;
            let table = Table::load(&request)?;
            for o in table.run(&request, &p)? {
                let d = &o.decision;
                println!("request   {}", o.name);
                println!("action    {}", d.action);
                println!("decision  {}", if d.allowed { "allow" } else { "deny" });
                if d.policy_ids.is_empty() {
                    println!("policies  none matched: deny by default");
                }
                for id in &d.policy_ids {
                    match p.reason(id) {
                        Some(r) => println!("policy    {id}: {r}"),
                        None => println!("policy    {id}"),
                    }
                }
                println!();
            }
            Ok(true)
        }
    }
}
