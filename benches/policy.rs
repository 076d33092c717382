//! Decision latency against a signature's: the default policy set and a set
//! of 1,000 policies, next to the k256 sign the decision guards, measured in
//! the same run. Run: `cargo bench --bench policy`.
//!
//! The account below has no keys, so its decisions are never kept: each row
//! is a whole decision. The "kept" row asks about an account with keys, the
//! same request each time: what a repeated request costs.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::Criterion;
use keyward::crypto::eip712::keccak256;
use keyward::policy::{
    decide, default_policies, Action, MessageFacts, Policies, PolicyRequest, RequestContext, Resource, TypedDataFacts,
    DEFAULT_FILES,
};
use keyward::store::{AccountRecord, KeyRecord};

fn account() -> AccountRecord {
    AccountRecord {
        id: "5d7c2a4e-1111-4222-8333-444455556666".into(),
        label: Some("alice".into()),
        controller: "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826".into(),
        created_by: "spiffe://example.org/admin".into(),
        created_at: 0,
        allowed: vec!["spiffe://example.org/marketplace".into()],
        keys: vec![],
        frozen: None,
        deleted_at: None,
    }
}

/// The default set plus 1,000 generated policies of the shapes operators
/// write: per-team permits, per-label forbids, per-chain forbids. Written
/// as equalities (`==`, which the engine indexes) or, `indexable` false,
/// as the same rules in shapes it cannot index (`like`, ranges): Cedar then
/// evaluates every one whose scope can match.
fn thousand(indexable: bool) -> Policies {
    let file = |name: &str, text: String| (PathBuf::from(name), text);
    let mut generated = String::new();
    for i in 0..1000 {
        let chain = 100_000 + i;
        let (team, label, chain) = if indexable {
            (
                format!("principal.team == \"team-{i}\""),
                format!("resource.label == \"frozen-{i}\""),
                format!("context.typed_data.chain_id == {chain}"),
            )
        } else {
            (
                format!("principal.team like \"team-{i}*\""),
                format!("resource.label like \"frozen-{i}*\""),
                format!(
                    "context.typed_data.chain_id >= {chain} && context.typed_data.chain_id < {}",
                    chain + 1
                ),
            )
        };
        let p = match i % 3 {
            0 => format!(
                "@id(\"team-{i}\") permit (principal, action == Keyward::Action::\"GetAccount\", resource is Keyward::Account) when {{ {team} }};\n"
            ),
            1 => format!(
                "@id(\"label-{i}\") forbid (principal, action in Keyward::Action::\"Sign\", resource is Keyward::Account) when {{ {label} }};\n"
            ),
            _ => format!(
                "@id(\"chain-{i}\") forbid (principal, action == Keyward::Action::\"SignTypedData\", resource) when {{ {chain} }};\n"
            ),
        };
        generated.push_str(&p);
    }
    let mut policies: Vec<_> = DEFAULT_FILES
        .iter()
        .filter(|(n, _)| n.ends_with(".cedar"))
        .map(|(n, t)| file(n, t.to_string()))
        .collect();
    policies.push(file("generated.cedar", generated));
    let schema = file(DEFAULT_FILES[0].0, DEFAULT_FILES[0].1.to_string());
    let clients = file(DEFAULT_FILES[1].0, DEFAULT_FILES[1].1.to_string());
    let p = Policies::from_sources(&schema, &policies, &clients, None).expect("the generated set validates");
    assert!(p.len() >= 1000);
    p
}

fn bench(c: &mut Criterion) {
    let a = account();
    let typed = RequestContext {
        typed_data: Some(TypedDataFacts {
            name: "Ether Mail".into(),
            version: "1".into(),
            chain_id: "1".into(),
            verifying_contract: "0xcccccccccccccccccccccccccccccccccccccccc".into(),
            primary_type: "Mail".into(),
        }),
        now: 1_800_000_000,
        ..RequestContext::default()
    };
    let message = RequestContext {
        message: Some(MessageFacts {
            alg: "secp256k1",
            length: 5,
        }),
        ..RequestContext::default()
    };
    let frozen = AccountRecord {
        label: Some("frozen-1".into()),
        ..account()
    };
    let sets = [
        ("default set", default_policies().expect("default set")),
        ("1,000 indexed policies", thousand(true)),
        ("1,000 unindexed policies", thousand(false)),
    ];
    for (name, set) in &sets {
        let req = PolicyRequest {
            principal: "spiffe://example.org/admin",
            action: Action::SignTypedData,
            resource: Resource::Account(&a),
            context: typed.clone(),
        };
        assert!(decide(&req, set).allowed, "{name}");
        c.bench_function(&format!("decide SignTypedData ({name})"), |b| {
            b.iter(|| decide(black_box(&req), set))
        });
        let denied = PolicyRequest {
            principal: "spiffe://example.org/wallet-gateway",
            action: Action::SignMessage,
            resource: Resource::Account(&a),
            context: message.clone(),
        };
        assert!(!decide(&denied, set).allowed, "{name}");
        c.bench_function(&format!("decide SignMessage denied ({name})"), |b| {
            b.iter(|| decide(black_box(&denied), set))
        });
        if *name != "default set" {
            // A request one generated forbid matches (label "frozen-1").
            let forbidden = PolicyRequest {
                resource: Resource::Account(&frozen),
                ..req.clone()
            };
            let d = decide(&forbidden, set);
            assert_eq!(d.policy_ids, ["label-1"], "{name}");
            c.bench_function(&format!("decide SignTypedData forbidden by label ({name})"), |b| {
                b.iter(|| decide(black_box(&forbidden), set))
            });
        }
    }
    let keyed = AccountRecord {
        keys: vec![KeyRecord {
            alg: keyward::types::KeyAlg::Ed25519,
            public_key: vec![1; 32],
            wrapped: vec![2; 40],
            kek_version: 1,
            key_version: 1,
        }],
        ..account()
    };
    let kept = PolicyRequest {
        principal: "spiffe://example.org/admin",
        action: Action::SignTypedData,
        resource: Resource::Account(&keyed),
        context: typed.clone(),
    };
    assert!(decide(&kept, &sets[0].1).allowed);
    c.bench_function("decide SignTypedData, decision kept (default set)", |b| {
        b.iter(|| decide(black_box(&kept), &sets[0].1))
    });
    let sk = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
    let digest = keccak256(b"bench");
    c.bench_function("k256 sign_prehash_recoverable", |b| {
        b.iter(|| sk.sign_prehash_recoverable(black_box(&digest)))
    });
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
