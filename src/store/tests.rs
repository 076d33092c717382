//! One conformance suite, run against every backend: SQLite in a temp
//! directory and PostgreSQL in a fresh schema (skipped loudly when no server
//! answers, unless `CI=true`).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::testing::{sqlite_url_in, PgTestSchema};
use super::*;

/// A place for one test's store; removed when dropped.
struct Fixture {
    backend: &'static str,
    url: String,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<PgTestSchema>,
}

impl Fixture {
    fn sqlite() -> Option<Fixture> {
        let dir = tempfile::tempdir().expect("tempdir");
        Some(Fixture {
            backend: "sqlite",
            url: sqlite_url_in(dir.path()),
            _dir: Some(dir),
            _schema: None,
        })
    }

    fn postgres() -> Option<Fixture> {
        let schema = PgTestSchema::create()?;
        Some(Fixture {
            backend: "postgres",
            url: schema.url().to_string(),
            _dir: None,
            _schema: Some(schema),
        })
    }

    async fn open(&self) -> Arc<dyn Store> {
        open(&self.url).await.expect("open store")
    }

    /// Runs raw SQL with binds `(text, text, bytes, i64)` on the backend's
    /// own connection type, bypassing the store.
    async fn raw_key(&self, account_id: &str, alg: &str, kek_version: i64) {
        const SQL_SQLITE: &str = "INSERT INTO account_keys \
            (account_id, alg, public_key, wrapped, kek_version, key_version) \
            VALUES (?1, ?2, ?3, ?3, ?4, 1)";
        const SQL_PG: &str = "INSERT INTO account_keys \
            (account_id, alg, public_key, wrapped, kek_version, key_version) \
            VALUES ($1, $2, $3, $3, $4, 1)";
        let bytes = vec![0u8, 1, 2];
        if self.backend == "sqlite" {
            let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
            sqlx::query(SQL_SQLITE)
                .bind(account_id)
                .bind(alg)
                .bind(bytes)
                .bind(kek_version)
                .execute(&mut c)
                .await
                .unwrap();
            c.close().await.unwrap();
        } else {
            let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
            sqlx::query(SQL_PG)
                .bind(account_id)
                .bind(alg)
                .bind(bytes)
                .bind(kek_version)
                .execute(&mut c)
                .await
                .unwrap();
            c.close().await.unwrap();
        }
    }
}

fn key(alg: KeyAlg, seed: u8, kek_version: u32) -> KeyRecord {
    KeyRecord {
        alg,
        // Every byte value, including NUL and 0xff, must survive.
        public_key: (0..=255u8).map(|b| b.wrapping_add(seed)).collect(),
        wrapped: (0..600u32).map(|i| (i as u8) ^ seed).collect(),
        kek_version,
        key_version: 1,
    }
}

fn record(id: &str) -> AccountRecord {
    AccountRecord {
        id: id.to_string(),
        label: Some(format!("treasury «{id}» ✓")),
        controller: "0x52908400098527886E0F7030069857D2E4169EE7".into(),
        created_by: "spiffe://example.org/admin".into(),
        created_at: 1_763_900_000,
        // Deliberately unsorted and with a duplicate.
        allowed: vec![
            "spiffe://example.org/wallet-gateway".into(),
            "spiffe://example.org/Marketplace".into(),
            "spiffe://example.org/marketplace".into(),
            "spiffe://example.org/wallet-gateway".into(),
        ],
        keys: vec![key(KeyAlg::Secp256k1, 7, 3), key(KeyAlg::Ed25519, 200, u32::MAX)],
    }
}

/// What `get_account` returns for `rec`.
fn as_read(rec: &AccountRecord) -> AccountRecord {
    let mut r = rec.clone();
    normalize(&mut r);
    r
}

async fn backend_and_ping(fx: &Fixture) {
    let store = fx.open().await;
    assert_eq!(store.backend(), fx.backend);
    store.ping().await.unwrap();
    store.close().await;
}

async fn round_trip(fx: &Fixture) {
    let store = fx.open().await;
    let full = record("acct-full");
    store.create_account(&full).await.unwrap();
    let got = store.get_account("acct-full").await.unwrap().unwrap();
    assert_eq!(got, as_read(&full));
    // Keys ordered by alg name; allowed sorted and deduplicated.
    assert_eq!(got.keys[0].alg, KeyAlg::Ed25519);
    assert_eq!(got.keys[1].alg, KeyAlg::Secp256k1);
    assert_eq!(got.keys[0].kek_version, u32::MAX);
    assert_eq!(
        got.allowed,
        [
            "spiffe://example.org/Marketplace",
            "spiffe://example.org/marketplace",
            "spiffe://example.org/wallet-gateway",
        ]
    );
    assert_eq!(got.keys[1].wrapped, full.keys[0].wrapped);

    let bare = AccountRecord {
        label: None,
        allowed: vec![],
        created_at: -1,
        ..record("acct-bare")
    };
    store.create_account(&bare).await.unwrap();
    let got = store.get_account("acct-bare").await.unwrap().unwrap();
    assert_eq!(got, as_read(&bare));
    assert_eq!(got.label, None);
    store.close().await;
}

async fn missing_is_none(fx: &Fixture) {
    let store = fx.open().await;
    assert_eq!(store.get_account("no-such-account").await.unwrap(), None);
    store.create_account(&record("present")).await.unwrap();
    assert_eq!(store.get_account("no-such-account").await.unwrap(), None);
    store.close().await;
}

async fn duplicate_is_conflict(fx: &Fixture) {
    let store = fx.open().await;
    let first = record("dup");
    store.create_account(&first).await.unwrap();
    let second = AccountRecord {
        label: Some("impostor".into()),
        created_by: "spiffe://example.org/other".into(),
        allowed: vec!["spiffe://example.org/intruder".into()],
        keys: vec![
            KeyRecord {
                key_version: 2,
                ..key(KeyAlg::Secp256k1, 99, 9)
            },
            key(KeyAlg::Ed25519, 98, 9),
        ],
        ..record("dup")
    };
    let err = store.create_account(&second).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { what } if what.contains("dup")),
        "{err:?}"
    );
    let got = store.get_account("dup").await.unwrap().unwrap();
    assert_eq!(got, as_read(&first), "first account untouched");
    assert_eq!(store.count_accounts().await.unwrap(), 1);
    store.close().await;
}

async fn failed_create_writes_nothing(fx: &Fixture) {
    let store = fx.open().await;
    // The account row goes in first; the second key collides with the first.
    let bad = AccountRecord {
        keys: vec![key(KeyAlg::Ed25519, 1, 1), key(KeyAlg::Ed25519, 2, 1)],
        ..record("half")
    };
    let err = store.create_account(&bad).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(store.get_account("half").await.unwrap(), None);
    assert_eq!(store.count_accounts().await.unwrap(), 0);
    // The id is still free.
    store.create_account(&record("half")).await.unwrap();
    store.close().await;
}

async fn concurrent_creates(fx: &Fixture) {
    let store = fx.open().await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let rec = record(&format!("conc-{i:02}"));
                store.create_account(&rec).await.map(|()| rec)
            })
        })
        .collect();
    let mut created = Vec::new();
    for t in tasks {
        created.push(t.await.unwrap().unwrap());
    }
    assert_eq!(store.count_accounts().await.unwrap(), 50);
    // Concurrent readers too.
    let reads: Vec<_> = created
        .into_iter()
        .map(|rec| {
            let store = store.clone();
            tokio::spawn(async move {
                let got = store.get_account(&rec.id).await.unwrap();
                assert_eq!(got, Some(as_read(&rec)));
            })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    store.close().await;
}

async fn count(fx: &Fixture) {
    let store = fx.open().await;
    assert_eq!(store.count_accounts().await.unwrap(), 0);
    for i in 0..3 {
        store.create_account(&record(&format!("c{i}"))).await.unwrap();
    }
    assert_eq!(store.count_accounts().await.unwrap(), 3);
    let _ = store.create_account(&record("c1")).await.unwrap_err();
    assert_eq!(store.count_accounts().await.unwrap(), 3);
    store.close().await;
}

async fn reopen(fx: &Fixture) {
    let store = fx.open().await;
    let rec = record("persisted");
    store.create_account(&rec).await.unwrap();
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable { .. })));
    drop(store);

    // Opening again runs the (already applied) migrations again.
    let store = fx.open().await;
    assert_eq!(store.get_account("persisted").await.unwrap(), Some(as_read(&rec)));
    assert_eq!(store.count_accounts().await.unwrap(), 1);
    store.close().await;

    if fx.backend == "sqlite" {
        let path = fx.url.strip_prefix("sqlite://").unwrap();
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "database file mode {mode:o}");
        let mut c = sqlx::SqliteConnection::connect(&fx.url).await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(journal.to_lowercase(), "wal");
        c.close().await.unwrap();
    }
}

async fn corrupt_row(fx: &Fixture) {
    let store = fx.open().await;
    let mut unknown_alg = record("bad-alg");
    unknown_alg.keys.clear();
    store.create_account(&unknown_alg).await.unwrap();
    fx.raw_key("bad-alg", "rsa2048", 1).await;
    let mut bad_version = record("bad-version");
    bad_version.keys.clear();
    store.create_account(&bad_version).await.unwrap();
    fx.raw_key("bad-version", "ed25519", -1).await;
    store.create_account(&record("good")).await.unwrap();

    let err = store.get_account("bad-alg").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { what } if what.contains("rsa2048")),
        "{err:?}"
    );
    let err = store.get_account("bad-version").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    // Other rows still read.
    assert!(store.get_account("good").await.unwrap().is_some());
    store.close().await;
}

/// Instantiates every case above for one backend.
macro_rules! conformance_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            conformance_suite!(@cases $fixture;
                backend_and_ping,
                round_trip,
                missing_is_none,
                duplicate_is_conflict,
                failed_create_writes_nothing,
                concurrent_creates,
                count,
                reopen,
                corrupt_row,
            );
        }
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(fx) = $fixture else { return };
                super::$case(&fx).await;
            }
        )*
    };
}

conformance_suite!(sqlite, super::Fixture::sqlite());
conformance_suite!(postgres, super::Fixture::postgres());

// Backend-specific and offline checks.

#[tokio::test]
async fn unreachable_postgres_is_unavailable_quickly() {
    let started = Instant::now();
    let err = open("postgres://postgres@127.0.0.1:1/test").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn errors_do_not_leak_passwords() {
    for url in [
        "postgres://keyward:hunter2secret@127.0.0.1:1/test",
        "postgresql://127.0.0.1:1/test?user=k&password=hunter2secret",
        "postgres://keyward:hunter2secret@127.0.0.1:1/test?sslmode=bogus",
        "mysql://keyward:hunter2secret@db/test",
    ] {
        let err = open(url).await.unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2secret"), "{shown}");
    }
}

#[tokio::test]
async fn invalid_urls() {
    for url in ["mysql://x/y", "", "sqlite::memory:", "sqlite://?mode=memory"] {
        let err = open(url).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn sqlite_creates_parent_dirs_and_tightens_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/keyward.db");
    let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
    store.create_account(&record("x")).await.unwrap();
    // SQLite gives the WAL and shared-memory files the database's mode.
    for suffix in ["-wal", "-shm"] {
        let side = dir.path().join(format!("a/b/keyward.db{suffix}"));
        let mode = std::fs::metadata(&side).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{suffix} mode {mode:o}");
    }
    store.close().await;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
    assert_eq!(store.count_accounts().await.unwrap(), 1);
    store.close().await;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn postgres_plain_search_path_parameter() {
    let Some(schema) = PgTestSchema::create() else {
        return;
    };
    let base = testing::postgres_base_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}search_path={}", schema.schema());
    let store = open(&url).await.unwrap();
    store.create_account(&record("in-schema")).await.unwrap();
    store.close().await;
    // The table landed in the private schema.
    let mut c = sqlx::PgConnection::connect(&base).await.unwrap();
    let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{}\".accounts", schema.schema()))
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    c.close().await.unwrap();
}

#[test]
fn key_record_debug_hides_wrapped() {
    let k = KeyRecord {
        public_key: vec![1, 2, 3],
        wrapped: vec![0xab; 40],
        ..key(KeyAlg::Ed25519, 0, 1)
    };
    let shown = format!("{k:?}");
    assert!(shown.contains("<40 bytes>"), "{shown}");
    assert!(!shown.contains("abab"), "{shown}");
    assert!(!shown.contains("171"), "{shown}");
}

#[test]
fn redaction() {
    assert_eq!(
        redact_url("postgres://u:p%40ss@h:5432/db?sslmode=require&password=x"),
        "postgres://u:***@h:5432/db?sslmode=require&password=***"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact_url("sqlite:///var/lib/k.db"), "sqlite:///var/lib/k.db");
    assert_eq!(
        super::postgres::with_search_path_option("postgres://h/db?sslmode=disable&search_path=s1"),
        "postgres://h/db?sslmode=disable&options[search_path]=s1"
    );
}
