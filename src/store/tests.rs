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
pub(super) struct Fixture {
    pub(super) backend: &'static str,
    pub(super) url: String,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<PgTestSchema>,
}

impl Fixture {
    pub(super) fn sqlite() -> Option<Fixture> {
        let dir = tempfile::tempdir().expect("tempdir");
        Some(Fixture {
            backend: "sqlite",
            url: sqlite_url_in(dir.path()),
            _dir: Some(dir),
            _schema: None,
        })
    }

    pub(super) fn postgres() -> Option<Fixture> {
        let schema = PgTestSchema::create()?;
        Some(Fixture {
            backend: "postgres",
            url: schema.url().to_string(),
            _dir: None,
            _schema: Some(schema),
        })
    }

    pub(super) async fn open(&self) -> Arc<dyn Store> {
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

    /// Runs raw SQL (no binds) on the backend's own connection type,
    /// bypassing the store.
    pub(super) async fn exec(&self, sql: &str) {
        if self.backend == "sqlite" {
            let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            c.close().await.unwrap();
        } else {
            let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            c.close().await.unwrap();
        }
    }

    /// The `BIGINT` result of a raw query, bypassing the store.
    pub(super) async fn scalar(&self, sql: &str) -> i64 {
        if self.backend == "sqlite" {
            let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
            let n = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
            c.close().await.unwrap();
            n
        } else {
            let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
            let n = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
            c.close().await.unwrap();
            n
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

pub(super) fn record(id: &str) -> AccountRecord {
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
        frozen: None,
        deleted_at: None,
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

// Delegated sessions.

const T0: i64 = 1_763_900_000;

fn challenge(id: &str, account_id: &str) -> ChallengeRecord {
    ChallengeRecord {
        id: id.to_string(),
        account_id: account_id.to_string(),
        delegate: "spiffe://example.org/agent «7»".into(),
        // Deliberately unsorted: order is kept.
        scopes: vec!["sign:tx".into(), "sign:message".into(), "admin:read".into()],
        cap: u128::MAX,
        nonce: std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xff),
        typed_data: r#"{"types":{"SessionGrant":[]},"message":{"cap":"340282366920938463463374607431768211455","note":"✓ \"quoted\""}}"#.into(),
        issued_at: T0,
        expires_at: T0 + 300,
    }
}

fn session(id: &str, account_id: &str, challenge_id: &str, cap: u128) -> SessionRecord {
    SessionRecord {
        id: id.to_string(),
        account_id: account_id.to_string(),
        delegate: "spiffe://example.org/agent «7»".into(),
        scopes: vec!["sign:tx".into(), "sign:message".into()],
        cap,
        remaining: cap,
        uses: 0,
        issued_at: T0 + 10,
        expires_at: T0 + 3600,
        challenge_id: challenge_id.to_string(),
        jti: format!("jti-{id}"),
        revoked_at: None,
        revoked_by: None,
        scope_grammar: crate::session::SCOPE_GRAMMAR,
    }
}

/// Creates account `acct` and a session `id` with `cap`, opened at `T0 + 10`.
pub(super) async fn open_new_session(store: &Arc<dyn Store>, acct: &str, id: &str, cap: u128) -> SessionRecord {
    if store.get_account(acct).await.unwrap().is_none() {
        store.create_account(&record(acct)).await.unwrap();
    }
    let ch = format!("ch-{id}");
    store.create_challenge(&challenge(&ch, acct)).await.unwrap();
    let s = session(id, acct, &ch, cap);
    assert_eq!(store.open_session(&ch, T0 + 10, &s).await.unwrap(), OpenOutcome::Opened);
    s
}

pub(super) fn spend<'a>(session_id: &'a str, request_id: &'a str, body: u8, amount: u128) -> SpendRequest<'a> {
    SpendRequest {
        session_id,
        request_id,
        body_hash: [body; 32],
        amount,
        asset_cap: None,
        fee: None,
        now: T0 + 100,
    }
}

async fn challenge_round_trip(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    let c = challenge("ch-1", "acct");
    store.create_challenge(&c).await.unwrap();
    assert_eq!(store.get_challenge("ch-1").await.unwrap(), Some((c.clone(), None)));
    assert_eq!(store.get_challenge("ch-none").await.unwrap(), None);

    let other = ChallengeRecord {
        delegate: "impostor".into(),
        cap: 0,
        ..challenge("ch-1", "acct")
    };
    let err = store.create_challenge(&other).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { what } if what.contains("ch-1")),
        "{err:?}"
    );
    assert_eq!(store.get_challenge("ch-1").await.unwrap(), Some((c, None)));

    let small = ChallengeRecord {
        cap: 0,
        scopes: vec![],
        nonce: [0; 32],
        ..challenge("ch-2", "acct")
    };
    store.create_challenge(&small).await.unwrap();
    assert_eq!(store.get_challenge("ch-2").await.unwrap(), Some((small, None)));

    // The account must exist.
    assert!(store
        .create_challenge(&challenge("ch-3", "no-such-account"))
        .await
        .is_err());
    assert_eq!(store.get_challenge("ch-3").await.unwrap(), None);
    store.close().await;
}

async fn session_round_trip(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    store.create_challenge(&challenge("ch-1", "acct")).await.unwrap();
    let s = SessionRecord {
        remaining: u128::MAX - 1,
        uses: 3,
        ..session("s-1", "acct", "ch-1", u128::MAX)
    };
    assert_eq!(
        store.open_session("ch-1", T0 + 5, &s).await.unwrap(),
        OpenOutcome::Opened
    );
    assert_eq!(store.get_session("s-1").await.unwrap(), Some(s.clone()));
    assert_eq!(store.get_session("s-none").await.unwrap(), None);
    let (_, consumed_at) = store.get_challenge("ch-1").await.unwrap().unwrap();
    assert_eq!(consumed_at, Some(T0 + 5));
    assert_eq!(store.list_sessions("acct").await.unwrap(), vec![s]);
    store.close().await;
}

async fn open_outcomes(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    store.create_challenge(&challenge("ch-1", "acct")).await.unwrap();
    let first = session("s-1", "acct", "ch-1", 500);
    assert_eq!(
        store.open_session("ch-1", T0 + 1, &first).await.unwrap(),
        OpenOutcome::Opened
    );
    let second = session("s-2", "acct", "ch-1", 500);
    assert_eq!(
        store.open_session("ch-1", T0 + 2, &second).await.unwrap(),
        OpenOutcome::ChallengeUsed
    );
    assert_eq!(store.get_session("s-2").await.unwrap(), None);
    assert_eq!(store.get_challenge("ch-1").await.unwrap().unwrap().1, Some(T0 + 1));

    // Expired at exactly expires_at; nothing consumed.
    store.create_challenge(&challenge("ch-old", "acct")).await.unwrap();
    let late = session("s-late", "acct", "ch-old", 500);
    assert_eq!(
        store.open_session("ch-old", T0 + 300, &late).await.unwrap(),
        OpenOutcome::ChallengeExpired
    );
    assert_eq!(store.get_challenge("ch-old").await.unwrap().unwrap().1, None);
    assert_eq!(store.get_session("s-late").await.unwrap(), None);
    // One second earlier it still opens.
    assert_eq!(
        store.open_session("ch-old", T0 + 299, &late).await.unwrap(),
        OpenOutcome::Opened
    );

    let ghost = session("s-ghost", "acct", "ch-none", 500);
    assert_eq!(
        store.open_session("ch-none", T0, &ghost).await.unwrap(),
        OpenOutcome::ChallengeNotFound
    );
    assert_eq!(store.get_session("s-ghost").await.unwrap(), None);

    // A session id that exists already: Conflict, challenge not consumed.
    store.create_challenge(&challenge("ch-3", "acct")).await.unwrap();
    let dup = session("s-1", "acct", "ch-3", 1);
    let err = store.open_session("ch-3", T0 + 3, &dup).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(store.get_challenge("ch-3").await.unwrap().unwrap().1, None);
    assert_eq!(store.get_session("s-1").await.unwrap(), Some(first));

    // A record naming another challenge is refused and consumes nothing.
    let wrong = session("s-wrong", "acct", "ch-1", 1);
    assert!(store.open_session("ch-3", T0 + 3, &wrong).await.is_err());
    assert_eq!(store.get_challenge("ch-3").await.unwrap().unwrap().1, None);
    assert_eq!(store.list_sessions("acct").await.unwrap().len(), 2);
    store.close().await;
}

async fn concurrent_opens(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    store.create_challenge(&challenge("ch-race", "acct")).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = session(&format!("s-{i:02}"), "acct", "ch-race", 100);
                store.open_session("ch-race", T0 + 1, &s).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let opened = outcomes.iter().filter(|o| **o == OpenOutcome::Opened).count();
    let used = outcomes.iter().filter(|o| **o == OpenOutcome::ChallengeUsed).count();
    assert_eq!((opened, used), (1, 19), "{outcomes:?}");
    assert_eq!(store.list_sessions("acct").await.unwrap().len(), 1);
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM sessions").await, 1);
    store.close().await;
}

async fn open_limit_is_exact(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    let open = |ch: String, id: String, max: u64| {
        let store = store.clone();
        async move {
            let s = session(&id, "acct", &ch, 100);
            store
                .open_session_audited(&ch, T0 + 1, &s, Some(max), None)
                .await
                .unwrap()
                .0
        }
    };
    for i in 0..3 {
        store
            .create_challenge(&challenge(&format!("ch-{i}"), "acct"))
            .await
            .unwrap();
    }
    assert_eq!(open("ch-0".into(), "s-0".into(), 2).await, OpenOutcome::Opened);
    assert_eq!(open("ch-1".into(), "s-1".into(), 2).await, OpenOutcome::Opened);
    // At the limit: refused, the challenge stays usable.
    assert_eq!(open("ch-2".into(), "s-2".into(), 2).await, OpenOutcome::TooManyOpen(2));
    assert_eq!(store.get_challenge("ch-2").await.unwrap().unwrap().1, None);
    assert_eq!(store.get_session("s-2").await.unwrap(), None);
    // A revoked session no longer counts.
    store
        .revoke_session("s-0", "spiffe://example.org/admin", T0 + 1)
        .await
        .unwrap();
    assert_eq!(open("ch-2".into(), "s-2".into(), 2).await, OpenOutcome::Opened);

    // Concurrent opens of one account never pass the limit.
    for i in 0..12 {
        store
            .create_challenge(&challenge(&format!("race-{i}"), "acct"))
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..12)
        .map(|i| tokio::spawn(open(format!("race-{i}"), format!("r-{i:02}"), 5)))
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let opened = outcomes.iter().filter(|o| **o == OpenOutcome::Opened).count();
    assert_eq!(opened, 3, "2 were open, limit 5: {outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, OpenOutcome::Opened | OpenOutcome::TooManyOpen(_))),
        "{outcomes:?}"
    );
    let live = store
        .list_sessions("acct")
        .await
        .unwrap()
        .iter()
        .filter(|s| s.revoked_at.is_none())
        .count();
    assert_eq!(live, 5);
    store.close().await;
}

async fn revoke_is_idempotent(fx: &Fixture) {
    let store = fx.open().await;
    let s = open_new_session(&store, "acct", "s-1", 100).await;
    let after = store
        .revoke_session("s-1", "spiffe://example.org/admin", T0 + 50)
        .await
        .unwrap();
    let expected = SessionRecord {
        revoked_at: Some(T0 + 50),
        revoked_by: Some("spiffe://example.org/admin".into()),
        ..s
    };
    assert_eq!(after, Some(expected.clone()));
    let again = store.revoke_session("s-1", "someone-else", T0 + 60).await.unwrap();
    assert_eq!(again, Some(expected.clone()));
    assert_eq!(store.get_session("s-1").await.unwrap(), Some(expected));
    assert_eq!(store.revoke_session("s-none", "x", T0).await.unwrap(), None);
    assert_eq!(store.get_session("s-none").await.unwrap(), None);
    store.close().await;
}

async fn list_newest_first(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    store.create_account(&record("other")).await.unwrap();
    assert_eq!(store.list_sessions("acct").await.unwrap(), vec![]);
    for (id, acct, issued_at) in [
        ("s-b", "acct", 7),
        ("s-old", "acct", 3),
        ("s-a", "acct", 7),
        ("s-new", "acct", 9),
        ("s-Z", "acct", 7),
        ("s-x", "other", 8),
    ] {
        let ch = format!("ch-{id}");
        store.create_challenge(&challenge(&ch, acct)).await.unwrap();
        let s = SessionRecord {
            issued_at: T0 + issued_at,
            ..session(id, acct, &ch, 1)
        };
        assert_eq!(store.open_session(&ch, T0, &s).await.unwrap(), OpenOutcome::Opened);
    }
    let ids: Vec<String> = store
        .list_sessions("acct")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["s-new", "s-Z", "s-a", "s-b", "s-old"]);
    let other = store.list_sessions("other").await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].id, "s-x");
    store.close().await;
}

async fn spend_lifecycle(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-1", 1000).await;
    let remaining = |store: Arc<dyn Store>| async move {
        let s = store.get_session("s-1").await.unwrap().unwrap();
        (s.remaining, s.uses)
    };

    let r1 = spend("s-1", "req-1", 1, 100);
    assert_eq!(
        store.reserve_spend(&r1).await.unwrap(),
        SpendOutcome::Reserved {
            remaining: 900,
            nonce: 1
        }
    );
    assert_eq!(store.reserve_spend(&r1).await.unwrap(), SpendOutcome::InProgress);
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-1", 2, 100)).await.unwrap(),
        SpendOutcome::BodyMismatch
    );
    let response: Vec<u8> = (0..=255u8).collect();
    store.complete_spend("s-1", "req-1", &response).await.unwrap();
    assert_eq!(
        store.reserve_spend(&r1).await.unwrap(),
        SpendOutcome::Replay {
            response: response.clone()
        }
    );
    // A second completion keeps the first response.
    store.complete_spend("s-1", "req-1", b"other").await.unwrap();
    // A replay answers even with another amount: the request id decides.
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-1", 1, 5)).await.unwrap(),
        SpendOutcome::Replay { response }
    );
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-1", 9, 100)).await.unwrap(),
        SpendOutcome::BodyMismatch
    );
    assert_eq!(remaining(store.clone()).await, (900, 1));
    // Releasing a completed or unknown spend changes nothing.
    store.release_spend("s-1", "req-1").await.unwrap();
    store.release_spend("s-1", "req-none").await.unwrap();
    store.release_spend("s-none", "req-1").await.unwrap();
    store.complete_spend("s-1", "req-none", b"x").await.unwrap();
    assert_eq!(remaining(store.clone()).await, (900, 1));

    // Release gives the amount back; the nonce is not reused.
    let r2 = spend("s-1", "req-2", 2, 300);
    assert_eq!(
        store.reserve_spend(&r2).await.unwrap(),
        SpendOutcome::Reserved {
            remaining: 600,
            nonce: 2
        }
    );
    store.release_spend("s-1", "req-2").await.unwrap();
    assert_eq!(remaining(store.clone()).await, (900, 2));
    store.release_spend("s-1", "req-2").await.unwrap();
    assert_eq!(remaining(store.clone()).await, (900, 2));
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-3", 3, 50)).await.unwrap(),
        SpendOutcome::Reserved {
            remaining: 850,
            nonce: 3
        }
    );
    // The released request id is free again.
    assert_eq!(
        store.reserve_spend(&r2).await.unwrap(),
        SpendOutcome::Reserved {
            remaining: 550,
            nonce: 4
        }
    );
    assert_eq!(remaining(store.clone()).await, (550, 4));
    // The whole remainder, then nothing more; zero still fits.
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-4", 4, 550)).await.unwrap(),
        SpendOutcome::Reserved { remaining: 0, nonce: 5 }
    );
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-5", 5, 0)).await.unwrap(),
        SpendOutcome::Reserved { remaining: 0, nonce: 6 }
    );
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM spends").await, 5);
    store.close().await;
}

async fn spend_refusals(fx: &Fixture) {
    let store = fx.open().await;
    let s = open_new_session(&store, "acct", "s-1", u128::MAX).await;
    assert_eq!(
        store.reserve_spend(&spend("s-none", "req-1", 1, 1)).await.unwrap(),
        SpendOutcome::NotFound
    );
    // Big amounts survive the TEXT round trip.
    assert_eq!(
        store
            .reserve_spend(&spend("s-1", "req-big", 1, u128::MAX - 10))
            .await
            .unwrap(),
        SpendOutcome::Reserved {
            remaining: 10,
            nonce: 1
        }
    );
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-2", 2, 11)).await.unwrap(),
        SpendOutcome::Insufficient {
            remaining: 10,
            asset: None,
            requested: 11
        }
    );
    let after = store.get_session("s-1").await.unwrap().unwrap();
    assert_eq!((after.remaining, after.uses), (10, 1));
    // An insufficient request left no row: the id is still free.
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-2", 2, 10)).await.unwrap(),
        SpendOutcome::Reserved { remaining: 0, nonce: 2 }
    );
    store.release_spend("s-1", "req-big").await.unwrap();
    assert_eq!(
        store.get_session("s-1").await.unwrap().unwrap().remaining,
        u128::MAX - 10
    );

    // Expired at exactly expires_at.
    let late = SpendRequest {
        now: s.expires_at,
        ..spend("s-1", "req-late", 3, 1)
    };
    assert_eq!(store.reserve_spend(&late).await.unwrap(), SpendOutcome::Expired);
    let in_time = SpendRequest {
        request_id: "req-in-time",
        now: s.expires_at - 1,
        ..late.clone()
    };
    assert!(matches!(
        store.reserve_spend(&in_time).await.unwrap(),
        SpendOutcome::Reserved { nonce: 3, .. }
    ));

    store.complete_spend("s-1", "req-2", b"done").await.unwrap();
    store.revoke_session("s-1", "admin", T0 + 200).await.unwrap();
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-4", 4, 1)).await.unwrap(),
        SpendOutcome::Revoked
    );
    // Revoked comes before Expired.
    assert_eq!(store.reserve_spend(&late).await.unwrap(), SpendOutcome::Revoked);
    // An existing spend row answers first, even after revocation.
    assert_eq!(
        store.reserve_spend(&spend("s-1", "req-2", 2, 10)).await.unwrap(),
        SpendOutcome::Replay {
            response: b"done".to_vec()
        }
    );
    assert_eq!(store.reserve_spend(&in_time).await.unwrap(), SpendOutcome::InProgress);
    let after = store.get_session("s-1").await.unwrap().unwrap();
    assert_eq!(after.uses, 3);
    store.close().await;
}

async fn spend_cap_race(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-race", 1000).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let request_id = format!("req-{i:03}");
                let r = SpendRequest {
                    body_hash: [i as u8; 32],
                    ..spend("s-race", &request_id, 0, 7)
                };
                store.reserve_spend(&r).await.unwrap()
            })
        })
        .collect();
    let mut nonces = Vec::new();
    let mut insufficient = 0;
    for t in tasks {
        match t.await.unwrap() {
            SpendOutcome::Reserved { remaining, nonce } => {
                assert!(remaining < 1000 && remaining % 7 == 1000 % 7, "{remaining}");
                nonces.push(nonce);
            }
            SpendOutcome::Insufficient { remaining, .. } => {
                assert_eq!(remaining, 6);
                insufficient += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((nonces.len(), insufficient), (142, 58));
    nonces.sort_unstable();
    assert_eq!(nonces, (1..=142).collect::<Vec<u64>>());
    let s = store.get_session("s-race").await.unwrap().unwrap();
    assert_eq!((s.remaining, s.uses), (1000 - 142 * 7, 142));
    assert_eq!(
        fx.scalar("SELECT COUNT(*) FROM spends WHERE session_id = 's-race'")
            .await,
        142
    );
    store.close().await;
}

/// Spends under an asset's own cap and under the session's cap, racing in one
/// session: each cap is exact, and neither takes from the other.
async fn asset_cap_race(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-assets", 300).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let request_id = format!("req-{i:03}");
                let r = SpendRequest {
                    body_hash: [i as u8; 32],
                    asset_cap: (i % 2 == 0).then_some(("USDC", 500)),
                    ..spend("s-assets", &request_id, 0, 7)
                };
                (request_id.clone(), i % 2 == 0, store.reserve_spend(&r).await.unwrap())
            })
        })
        .collect();
    let (mut in_asset, mut in_session, mut nonces) = (Vec::new(), 0u32, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            (id, asset, SpendOutcome::Reserved { nonce, .. }) => {
                nonces.push(nonce);
                if asset {
                    in_asset.push(id);
                } else {
                    in_session += 1;
                }
            }
            (_, true, SpendOutcome::Insufficient { remaining, asset, .. }) => {
                assert_eq!((remaining, asset.as_deref()), (500 % 7, Some("USDC")))
            }
            (_, false, SpendOutcome::Insufficient { remaining, asset, .. }) => {
                assert_eq!((remaining, asset), (300 % 7, None))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((in_asset.len(), in_session), (500 / 7, 300 / 7));
    nonces.sort_unstable();
    assert_eq!(nonces, (1..=(500 / 7 + 300 / 7) as u64).collect::<Vec<u64>>());
    let s = store.get_session("s-assets").await.unwrap().unwrap();
    assert_eq!(
        s.remaining,
        300 - 7 * (300 / 7),
        "asset spends leave the session's cap alone"
    );
    let spent = || fx.scalar("SELECT CAST(spent AS BIGINT) FROM session_assets WHERE session_id = 's-assets'");
    assert_eq!(spent().await, 7 * (500 / 7));
    // Releasing an asset's spend gives it back to that asset only.
    store.release_spend("s-assets", &in_asset[0]).await.unwrap();
    assert_eq!(spent().await, 7 * (500 / 7 - 1));
    let again = SpendRequest {
        asset_cap: Some(("USDC", 500)),
        ..spend("s-assets", "after", 9, 7)
    };
    assert!(matches!(
        store.reserve_spend(&again).await.unwrap(),
        SpendOutcome::Reserved { remaining, .. } if remaining == 500 % 7
    ));
    assert_eq!(
        store.get_session("s-assets").await.unwrap().unwrap().remaining,
        s.remaining
    );
    store.close().await;
}

/// A spend with a second part (a transaction's gas in another asset) is
/// reserved whole or not at all, and released whole.
async fn two_part_spends(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-two", 100).await;
    let two = |id, amount, gas| SpendRequest {
        asset_cap: Some(("USDC", 50)),
        fee: Some(SpendPart {
            amount: gas,
            asset_cap: None,
        }),
        ..spend("s-two", id, 1, amount)
    };
    assert!(matches!(
        store.reserve_spend(&two("a", 30, 80)).await.unwrap(),
        SpendOutcome::Reserved { remaining: 20, .. }
    ));
    let s = store.get_session("s-two").await.unwrap().unwrap();
    assert_eq!(s.remaining, 20, "the gas part took from the session's cap");
    // The gas does not fit: nothing of the token part is taken either.
    assert_eq!(
        store.reserve_spend(&two("b", 10, 30)).await.unwrap(),
        SpendOutcome::Insufficient {
            remaining: 20,
            asset: None,
            requested: 30
        }
    );
    // Nor when the token does not fit.
    assert_eq!(
        store.reserve_spend(&two("c", 21, 1)).await.unwrap(),
        SpendOutcome::Insufficient {
            remaining: 20,
            asset: Some("USDC".into()),
            requested: 21
        }
    );
    let spent = || fx.scalar("SELECT CAST(spent AS BIGINT) FROM session_assets WHERE session_id = 's-two'");
    assert_eq!(spent().await, 30);
    // Parts counting against the same cap add up.
    let same = SpendRequest {
        asset_cap: None,
        fee: Some(SpendPart {
            amount: 11,
            asset_cap: None,
        }),
        ..spend("s-two", "d", 1, 10)
    };
    assert!(matches!(
        store.reserve_spend(&same).await.unwrap(),
        SpendOutcome::Insufficient { requested: 21, .. }
    ));
    store.release_spend("s-two", "a").await.unwrap();
    assert_eq!(spent().await, 0);
    assert_eq!(store.get_session("s-two").await.unwrap().unwrap().remaining, 100);
    store.close().await;
}

async fn corrupt_session_rows(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-1", 100).await;
    open_new_session(&store, "acct", "s-2", 100).await;
    store.create_challenge(&challenge("ch-bad", "acct")).await.unwrap();
    fx.exec("UPDATE sessions SET remaining = '12x' WHERE id = 's-1'").await;
    fx.exec("UPDATE sessions SET scopes = 'not json' WHERE id = 's-2'")
        .await;
    let short_nonce = if fx.backend == "sqlite" {
        "X'0102'"
    } else {
        "'\\x0102'::bytea"
    };
    fx.exec(&format!(
        "UPDATE challenges SET nonce = {short_nonce} WHERE id = 'ch-bad'"
    ))
    .await;

    let corrupt = |r: Result<_, StoreError>| matches!(r, Err(StoreError::Corrupt { .. }));
    assert!(corrupt(store.get_session("s-1").await.map(|_| ())));
    assert!(corrupt(store.get_session("s-2").await.map(|_| ())));
    assert!(corrupt(store.list_sessions("acct").await.map(|_| ())));
    assert!(corrupt(store.reserve_spend(&spend("s-1", "r", 1, 1)).await.map(|_| ())));
    assert!(corrupt(store.get_challenge("ch-bad").await.map(|_| ())));
    // The spend was not recorded; other rows still read.
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM spends").await, 0);
    assert!(store.get_challenge("ch-s-1").await.unwrap().is_some());

    // A pending spend whose amount is corrupt is not released.
    fx.exec("UPDATE sessions SET remaining = '100', scopes = '[]'").await;
    assert!(matches!(
        store.reserve_spend(&spend("s-1", "r", 1, 1)).await.unwrap(),
        SpendOutcome::Reserved {
            remaining: 99,
            nonce: 1
        }
    ));
    fx.exec("UPDATE spends SET amount = '-1'").await;
    assert!(corrupt(store.release_spend("s-1", "r").await));
    assert_eq!(store.get_session("s-1").await.unwrap().unwrap().remaining, 99);
    store.close().await;
}

/// One test per case, each on a fresh `$fixture`; a case is an
/// `async fn(&Fixture)` of the module around the invocation's module.
macro_rules! fixture_cases {
    ($fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(fx) = $fixture else { return };
                super::$case(&fx).await;
            }
        )*
    };
}
pub(super) use fixture_cases;

/// Instantiates every case above for one backend.
macro_rules! conformance_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            fixture_cases!($fixture;
                backend_and_ping,
                round_trip,
                missing_is_none,
                duplicate_is_conflict,
                failed_create_writes_nothing,
                concurrent_creates,
                count,
                reopen,
                corrupt_row,
                challenge_round_trip,
                session_round_trip,
                open_outcomes,
                concurrent_opens,
                open_limit_is_exact,
                revoke_is_idempotent,
                list_newest_first,
                spend_lifecycle,
                spend_refusals,
                spend_cap_race,
                asset_cap_race,
                two_part_spends,
                corrupt_session_rows,
            );
        }
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
