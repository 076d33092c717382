//! Retention, pagination and the open-session count, on every backend:
//! pages follow their cursor in byte order, the count is exact, the prune
//! deletes exactly what ended before the retention (children first, in
//! batches), every one of these statements runs on an index, and the
//! receipt-caller migration keeps every receipt.

use std::borrow::Cow;

use sqlx::Connection;

use super::dialect::Dialect;
use super::shared::{sessions_page_sql, COUNT_OPEN_SESSIONS, DELETE_STALE_CHALLENGES, ENDED_SESSIONS};
use super::tests::{fixture_cases, open_new_session, record, spend, Fixture};
use super::*;

const T0: i64 = 1_763_900_000;

fn challenge(id: &str, account_id: &str, expires_at: i64) -> ChallengeRecord {
    ChallengeRecord {
        id: id.to_string(),
        account_id: account_id.to_string(),
        delegate: "spiffe://example.org/agent".into(),
        scopes: vec!["payments:0-100".into()],
        cap: 100,
        nonce: [7; 32],
        typed_data: "{}".into(),
        issued_at: expires_at - 300,
        expires_at,
    }
}

/// Opens session `id` of `acct` issued at `issued_at`, expiring at
/// `expires_at`, through a challenge of its own (`ch-<id>`).
async fn open_at(store: &Arc<dyn Store>, acct: &str, id: &str, issued_at: i64, expires_at: i64) {
    let ch = format!("ch-{id}");
    store
        .create_challenge(&challenge(&ch, acct, issued_at + 300))
        .await
        .unwrap();
    let s = SessionRecord {
        id: id.to_string(),
        account_id: acct.to_string(),
        delegate: "spiffe://example.org/agent".into(),
        scopes: vec!["payments:0-100".into()],
        cap: 100,
        remaining: 100,
        uses: 0,
        issued_at,
        expires_at,
        challenge_id: ch.clone(),
        jti: format!("jti-{id}"),
        revoked_at: None,
        revoked_by: None,
        scope_grammar: crate::session::SCOPE_GRAMMAR,
    };
    assert_eq!(
        store.open_session(&ch, issued_at, &s).await.unwrap(),
        OpenOutcome::Opened
    );
}

/// The ids of every session of `acct`, in listing order.
async fn ids(store: &Arc<dyn Store>, acct: &str) -> Vec<String> {
    store
        .list_sessions(acct)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect()
}

async fn pages_follow_the_cursor(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    store.create_account(&record("other")).await.unwrap();
    // Ties on issued_at, ids differing in case only in byte order (Z < a).
    for (id, at) in [
        ("s-b", 7),
        ("s-old", 3),
        ("s-a", 7),
        ("s-new", 9),
        ("s-Z", 7),
        ("s-c", 7),
        ("s-mid", 5),
    ] {
        open_at(&store, "acct", id, T0 + at, T0 + 3600).await;
    }
    open_at(&store, "other", "s-x", T0 + 8, T0 + 3600).await;
    let expected = ["s-new", "s-Z", "s-a", "s-b", "s-c", "s-mid", "s-old"];
    for limit in [1u32, 2, 3, 7, 100] {
        let mut ids = Vec::new();
        let mut after: Option<SessionCursor> = None;
        let mut pages = 0;
        loop {
            let page = store.list_sessions_page("acct", after.as_ref(), limit).await.unwrap();
            assert!(page.len() <= limit as usize);
            pages += 1;
            ids.extend(page.iter().map(|s| s.id.clone()));
            match page.last() {
                Some(last) if page.len() == limit as usize => after = Some(SessionCursor::after(last)),
                _ => break,
            }
        }
        assert_eq!(ids, expected, "pages of {limit}");
        assert!(
            pages >= expected.len().div_ceil(limit as usize),
            "{pages} pages of {limit}"
        );
    }
    assert_eq!(ids(&store, "acct").await, expected);
    // After the last session: nothing. Another account's cursor positions only.
    let last = SessionCursor {
        issued_at: T0 + 3,
        id: "s-old".into(),
    };
    assert!(store
        .list_sessions_page("acct", Some(&last), 10)
        .await
        .unwrap()
        .is_empty());
    let other = store.list_sessions_page("other", None, 10).await.unwrap();
    assert_eq!(other.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s-x"]);
    store.close().await;
}

async fn open_count_is_exact(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    store.create_account(&record("other")).await.unwrap();
    open_at(&store, "acct", "s-open", T0, T0 + 100).await;
    open_at(&store, "acct", "s-open-2", T0, T0 + 200).await;
    open_at(&store, "acct", "s-expired", T0, T0 + 50).await;
    open_at(&store, "acct", "s-revoked", T0, T0 + 100).await;
    open_at(&store, "other", "s-theirs", T0, T0 + 100).await;
    store.revoke_session("s-revoked", "admin", T0 + 1).await.unwrap();
    assert_eq!(store.count_open_sessions("acct", T0 + 60).await.unwrap(), 2);
    // Expired at exactly expires_at.
    assert_eq!(store.count_open_sessions("acct", T0 + 100).await.unwrap(), 1);
    assert_eq!(store.count_open_sessions("acct", T0 + 200).await.unwrap(), 0);
    assert_eq!(store.count_open_sessions("nobody", T0).await.unwrap(), 0);
    store.close().await;
}

async fn prune_deletes_what_ended_before_the_retention(fx: &Fixture) {
    let store = fx.open().await;
    store.create_account(&record("acct")).await.unwrap();
    let now = T0 + 100_000;
    let before = now - 10_000;
    // Gone: expired before the cutoff (one with a spend), revoked before it
    // and expired since.
    for i in 0..5 {
        open_at(&store, "acct", &format!("s-expired-{i}"), T0, before - 1).await;
    }
    open_at(&store, "acct", "s-spent", T0, T0 + 200).await;
    assert!(matches!(
        store.reserve_spend(&spend("s-spent", "r-1", 1, 10)).await.unwrap(),
        SpendOutcome::Reserved { .. }
    ));
    store.complete_spend("s-spent", "r-1", b"done").await.unwrap();
    open_at(&store, "acct", "s-revoked-old", T0, now - 1).await;
    store
        .revoke_session("s-revoked-old", "admin", before - 5)
        .await
        .unwrap();
    // Kept: revoked before the cutoff but its token is still valid; expired
    // or revoked after the cutoff; open.
    open_at(&store, "acct", "s-revoked-live", T0, now + 100).await;
    store
        .revoke_session("s-revoked-live", "admin", before - 5)
        .await
        .unwrap();
    open_at(&store, "acct", "s-expired-recent", T0, before + 1).await;
    open_at(&store, "acct", "s-expired-at-cutoff", T0, before).await;
    open_at(&store, "acct", "s-revoked-recent", T0, now - 1).await;
    store
        .revoke_session("s-revoked-recent", "admin", before + 5)
        .await
        .unwrap();
    open_at(&store, "acct", "s-open", now - 50, now + 3600).await;
    // Challenges never opened: gone when expired before the cutoff.
    for i in 0..3 {
        store
            .create_challenge(&challenge(&format!("ch-stale-{i}"), "acct", before - 1))
            .await
            .unwrap();
    }
    store
        .create_challenge(&challenge("ch-fresh", "acct", before))
        .await
        .unwrap();

    // Batches of 2: several transactions for each kind.
    let pruned = store.prune_sessions(before, now, 2).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            sessions: 7,
            challenges: 10
        }
    );
    let mut left = ids(&store, "acct").await;
    left.sort();
    assert_eq!(
        left,
        [
            "s-expired-at-cutoff",
            "s-expired-recent",
            "s-open",
            "s-revoked-live",
            "s-revoked-recent"
        ]
    );
    assert_eq!(
        fx.scalar("SELECT COUNT(*) FROM spends").await,
        0,
        "the spend went with its session"
    );
    // The kept sessions' challenges and the fresh one stay; the others went.
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM challenges").await, 6);
    assert!(store.get_challenge("ch-fresh").await.unwrap().is_some());
    assert!(store.get_challenge("ch-s-open").await.unwrap().is_some());
    assert!(store.get_challenge("ch-stale-0").await.unwrap().is_none());
    assert!(store.get_challenge("ch-s-spent").await.unwrap().is_none());
    // Nothing more to do; the account is untouched.
    assert_eq!(store.prune_sessions(before, now, 2).await.unwrap(), Pruned::default());
    assert!(store.get_account("acct").await.unwrap().is_some());
    store.close().await;
}

/// One bind of a plan query.
#[derive(Clone)]
enum Bind {
    Text(&'static str),
    Int(i64),
}

/// Binds `binds` to the query `q`, in order.
macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::Text(t) => q.bind(*t),
                Bind::Int(i) => q.bind(*i),
            };
        }
        q
    }};
}

/// The plan the database makes for `sql` (PostgreSQL: with sequential
/// scans priced out, so the plan shows whether an index can serve it).
async fn plan(fx: &Fixture, sql: &str, binds: &[Bind]) -> String {
    if fx.backend == "sqlite" {
        let mut c = sqlx::SqliteConnection::connect(&fx.url).await.unwrap();
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let q = bind_all!(sqlx::query_as::<_, (i64, i64, i64, String)>(&explain), binds);
        let rows = q.fetch_all(&mut c).await.unwrap();
        c.close().await.unwrap();
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
    } else {
        let mut c = sqlx::PgConnection::connect(&fx.url).await.unwrap();
        sqlx::raw_sql("SET enable_seqscan = off").execute(&mut c).await.unwrap();
        let explain = format!("EXPLAIN {sql}");
        let rows = bind_all!(sqlx::query_scalar::<_, String>(&explain), binds)
            .fetch_all(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        rows.join("\n")
    }
}

async fn retention_and_counts_run_on_indexes(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-1", 100).await;
    store.close().await;
    let full_scan = |p: &str| {
        // SQLite: "SCAN sessions" / "SCAN c"; PostgreSQL: "Seq Scan".
        p.lines().any(|l| {
            let l = l.trim_start_matches(|c: char| !c.is_alphabetic());
            l.starts_with("SCAN ") || l.starts_with("Seq Scan")
        })
    };
    let count = plan(fx, COUNT_OPEN_SESSIONS, &[Bind::Text("acct"), Bind::Int(T0)]).await;
    assert!(count.contains("sessions_open"), "{count}");
    assert!(!full_scan(&count), "{count}");
    let ended = plan(fx, ENDED_SESSIONS, &[Bind::Int(T0), Bind::Int(T0), Bind::Int(500)]).await;
    assert!(
        ended.contains("sessions_expires") && ended.contains("sessions_revoked"),
        "{ended}"
    );
    assert!(!full_scan(&ended), "{ended}");
    let stale = plan(fx, DELETE_STALE_CHALLENGES, &[Bind::Int(T0), Bind::Int(500)]).await;
    assert!(stale.contains("challenges_expires"), "{stale}");
    assert!(!full_scan(&stale), "{stale}");
    let byte_order = if fx.backend == "sqlite" {
        sqlx::Sqlite::BYTE_ORDER
    } else {
        sqlx::Postgres::BYTE_ORDER
    };
    let binds = [Bind::Text("acct"), Bind::Int(100), Bind::Int(T0), Bind::Text("s-1")];
    let page = plan(fx, &sessions_page_sql(byte_order, true), &binds).await;
    // The range starts at the cursor: account and issue time in the index condition.
    assert!(page.contains("sessions_account"), "{page}");
    assert!(
        page.lines()
            .any(|l| l.contains("issued_at<?") || (l.contains("Index Cond") && l.contains("issued_at <="))),
        "{page}"
    );
    assert!(!full_scan(&page), "{page}");
}

/// The migrations up to and including `last`, of the backend's set.
fn migrator(backend: &str, last: i64) -> sqlx::migrate::Migrator {
    let mut m = if backend == "sqlite" {
        sqlx::migrate!("./migrations/sqlite")
    } else {
        sqlx::migrate!("./migrations/postgres")
    };
    m.migrations = Cow::Owned(m.migrations.iter().filter(|x| x.version <= last).cloned().collect());
    m
}

async fn receipt_callers_migration_keeps_every_receipt(fx: &Fixture) {
    // The schema as it was before receipts had callers, with two receipts:
    // one whose audit event names its caller, one without an event.
    let h32 = if fx.backend == "sqlite" {
        "zeroblob(32)"
    } else {
        "decode(repeat('00', 32), 'hex')"
    };
    let rows = format!(
        "INSERT INTO accounts (id, label, controller, created_by, created_at) \
         VALUES ('acct', NULL, '0x52908400098527886E0F7030069857D2E4169EE7', 'admin', 1); \
         INSERT INTO audit_events (seq, time_ms, identity, action, account, session, request_id, decision, \
         policies, code, digest, signature_ref, prev_hash, hash) VALUES (7, 1, 'spiffe://example.org/m', \
         'SignReceipt', 'acct', '', 'q1', 'allow', '[]', 'OK', '', 'receipt:r1', {h32}, {h32}); \
         INSERT INTO receipts (receipt_id, account_id, request_id, body_hash, session_id, created_at, jws, audit_seq) \
         VALUES ('r1', 'acct', 'q1', {h32}, NULL, 1, 'jws-1', 7), ('r2', 'acct', 'q2', {h32}, NULL, 1, 'jws-2', NULL)"
    );
    if fx.backend == "sqlite" {
        let options = fx
            .url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        migrator("sqlite", 8).run(&mut c).await.unwrap();
        sqlx::raw_sql(&rows).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(&fx.url).await.unwrap();
        migrator("postgres", 8).run(&mut c).await.unwrap();
        sqlx::raw_sql(&rows).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
    }
    // Opening the store runs the rest.
    let store = fx.open().await;
    let r1 = store
        .get_receipt("acct", "spiffe://example.org/m", "q1")
        .await
        .unwrap()
        .expect("r1 kept");
    assert_eq!((r1.receipt_id.as_str(), r1.seq, r1.jws.as_str()), ("r1", 7, "jws-1"));
    let r2 = store.get_receipt("acct", "", "q2").await.unwrap().expect("r2 kept");
    assert_eq!((r2.receipt_id.as_str(), r2.jws.as_str()), ("r2", "jws-2"));
    // The next receipt's own seq is past the old ones.
    let new = NewReceipt {
        receipt_id: "r3",
        account_id: "acct",
        caller: "spiffe://example.org/m",
        request_id: "q1-again",
        body_hash: [3; 32],
        session_id: None,
        created_at: 2,
        audit: None,
        abandon: None,
    };
    let signer: ReceiptSigner = Box::new(|f: ReceiptFacts| Box::pin(async move { Ok(format!("jws.{}", f.audit_seq)) }));
    let ReceiptOutcome::Recorded(r3) = store.record_receipt(&new, signer).await.unwrap() else {
        panic!("not recorded")
    };
    assert!(r3.seq > r2.seq, "{} after {}", r3.seq, r2.seq);
    store.close().await;
}

macro_rules! retention_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            super::fixture_cases!($fixture;
                pages_follow_the_cursor,
                open_count_is_exact,
                prune_deletes_what_ended_before_the_retention,
                retention_and_counts_run_on_indexes,
                receipt_callers_migration_keeps_every_receipt,
            );
        }
    };
}

retention_suite!(sqlite, super::Fixture::sqlite());
retention_suite!(postgres, super::Fixture::postgres());
