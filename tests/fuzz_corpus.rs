//! The fuzz targets without the fuzzer, for CI (which never builds the `fuzz/` crate): every
//! committed corpus file (`fuzz/corpus/<target>/`) and regression input
//! (`fuzz/regressions/<target>/`) goes through the same function the fuzz target calls
//! (`keyward::fuzzing`), and the keyward/jsonwebtoken differential runs over deterministic
//! mutations of tokens from a seeded RNG.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use keyward::crypto::jws::{JwsAlg, MAX_TOKEN_LEN};
use keyward::fuzzing::{self, differential, fixed_keys, sign_parts, Outcome, Signer, Strictness};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn every_committed_corpus_and_regression_file_replays_through_its_target() {
    let mut replayed = 0;
    for (name, target) in fuzzing::TARGETS {
        assert!(
            fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")).is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(corpus.len() >= 3, "fuzz/corpus/{name} has {} files", corpus.len());
        for path in corpus.iter().chain(&files(&fuzz_dir().join("regressions").join(name))) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("{name}: {} fails (see the panic above)", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 3 * fuzzing::TARGETS.len());
}

/// Header templates for a token signed by the key of `alg`: `{A}` is the alg, `{K}` the kid.
const HEADERS: &[&str] = &[
    r#"{"alg":"{A}","kid":"{K}"}"#,
    r#"{"alg":"{A}","kid":"{K}","typ":"JWT"}"#,
    r#" { "typ" : "x+jwt" , "kid" : "{K}" , "alg" : "{A}" } "#,
    r#"{"alg":"{A}","kid":"{K}","cty":"JWT","x5t":"abc"}"#,
    // Duplicate members.
    r#"{"alg":"{A}","kid":"{K}","alg":"{A}"}"#,
    r#"{"alg":"{A}","kid":"{K}","ext":"1","ext":"2"}"#,
    // crit, a null typ.
    r#"{"alg":"{A}","kid":"{K}","crit":["exp"],"exp":"1"}"#,
    r#"{"alg":"{A}","kid":"{K}","typ":null}"#,
    // Members jsonwebtoken's typed header cannot hold.
    r#"{"alg":"{A}","kid":"{K}","ext":1}"#,
    r#"{"alg":"{A}","kid":"{K}","jwk":"not a key"}"#,
    r#"{"alg":"{A}","kid":"{K}","x5c":"not a list"}"#,
    // Wrong kid, alg, types.
    r#"{"alg":"{A}"}"#,
    r#"{"alg":"{A}","kid":null}"#,
    r#"{"alg":"{A}","kid":"no such key"}"#,
    r#"{"alg":"{A}","kid":"{O}"}"#,
    r#"{"alg":"none","kid":"{K}"}"#,
    r#"{"alg":"HS256","kid":"{K}"}"#,
    r#"{"alg":"ES384","kid":"{K}"}"#,
    r#"{"alg":"eddsa","kid":"{K}"}"#,
    r#"{"alg":"{A}","kid":"{K}","typ":1}"#,
    r#"["{A}","{K}"]"#,
    r#"{"alg":"{A}","kid":"{K}""#,
    "",
];

const PAYLOADS: &[&str] = &[
    r#"{"sub":"acct-1","exp":4102444800,"scopes":["payments:0-100"]}"#,
    "{}",
    r#"{"n":1.5e400,"big":123456789012345678901234567890,"s":"\u00e9\ud83d\ude00"}"#,
    r#"{"a":{"b":1,"b":2}}"#,
    r#"{"a":1,"a":2}"#,
    r#"[0,0,"s","i","a"]"#,
    r#"[1]"#,
    r#""text""#,
    "null",
    r#"{"sub":["x"]}"#,
    r#"{"sub":{"x":1}}"#,
    r#"{"exp":"soon","aud":5,"iss":[1]}"#,
    "not json",
];

const SIGNERS: [Signer; 6] = [
    Signer::EdDSA,
    Signer::EdDSASmallOrderR,
    Signer::ES256 { high_s: false },
    Signer::ES256 { high_s: true },
    Signer::ES256K { high_s: false },
    Signer::ES256K { high_s: true },
];

fn header(template: &str, alg: JwsAlg) -> String {
    let keys = fixed_keys();
    let other = match alg {
        JwsAlg::EdDSA => JwsAlg::ES256,
        _ => JwsAlg::EdDSA,
    };
    template
        .replace("{A}", alg.as_str())
        .replace("{K}", &keys.jwk(alg).kid)
        .replace("{O}", &keys.jwk(other).kid)
}

/// One random edit of a token's text.
fn mutate(rng: &mut StdRng, token: &str) -> String {
    const ALPHABET: &[u8] = b"AQgw_-+/=.0 e";
    let mut t = token.as_bytes().to_vec();
    let i = rng.gen_range(0..t.len().max(1));
    match rng.gen_range(0..5) {
        0 if !t.is_empty() => t[i] = ALPHABET[rng.gen_range(0..ALPHABET.len())],
        1 if !t.is_empty() => {
            t.remove(i);
        }
        2 => t.insert(i.min(t.len()), ALPHABET[rng.gen_range(0..ALPHABET.len())]),
        3 => t.truncate(i),
        _ => {
            // Swap the last two characters of a part boundary's neighbourhood.
            if i + 1 < t.len() {
                t.swap(i, i + 1);
            }
        }
    }
    String::from_utf8(t).unwrap_or_default()
}

/// keyward's verifier and jsonwebtoken's (EdDSA, ES256; jsonwebtoken has no ES256K) agree on
/// every generated token, except where a documented keyward rule refuses what jsonwebtoken
/// accepts, or jsonwebtoken's typed header or claims refuse what keyward accepts; each such
/// difference shows up at least once, so the oracle is exercised, not vacuous.
#[test]
fn keyward_and_jsonwebtoken_agree_on_generated_tokens_except_where_documented() {
    let mut rng = StdRng::seed_from_u64(0x006b_6579_7761_7264);
    let mut tokens = Vec::new();
    for signer in SIGNERS {
        for h in HEADERS {
            for p in PAYLOADS {
                tokens.push(sign_parts(signer, header(h, signer.alg()).as_bytes(), p.as_bytes()));
            }
        }
        // Over the size limit, otherwise valid.
        let big = format!(r#"{{"pad":"{}"}}"#, "a".repeat(MAX_TOKEN_LEN));
        tokens.push(sign_parts(
            signer,
            header(HEADERS[0], signer.alg()).as_bytes(),
            big.as_bytes(),
        ));
    }
    let valid: Vec<String> = tokens.iter().step_by(PAYLOADS.len() * 3).cloned().collect();
    for _ in 0..3000 {
        let base = &valid[rng.gen_range(0..valid.len())];
        let mut t = mutate(&mut rng, base);
        for _ in 0..rng.gen_range(0..3) {
            t = mutate(&mut rng, &t);
        }
        tokens.push(t);
    }

    let mut seen: HashMap<Outcome, usize> = HashMap::new();
    for t in &tokens {
        *seen.entry(differential(t)).or_default() += 1;
    }
    let expected = [
        Outcome::BothAccept,
        Outcome::BothReject,
        Outcome::KeywardStricter(Strictness::TooLarge),
        Outcome::KeywardStricter(Strictness::DuplicateMember),
        Outcome::KeywardStricter(Strictness::Crit),
        Outcome::KeywardStricter(Strictness::NonStringTyp),
        Outcome::KeywardStricter(Strictness::PayloadNotObject),
        Outcome::KeywardStricter(Strictness::Ed25519SmallOrderR),
        Outcome::JwtHeaderTyping,
        Outcome::JwtClaimsTyping,
        Outcome::JwtLacksEs256k,
    ];
    for o in expected {
        assert!(seen.contains_key(&o), "{o:?} never seen: {seen:?}");
    }
    assert!(seen[&Outcome::BothAccept] >= 50, "{seen:?}");
}

/// Writes the seed inputs of every target to `fuzz/corpus/<target>/seed-*` (then minimised
/// with `scripts/fuzz.sh cmin`): run with `cargo test --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed corpus; not a check"]
fn write_seed_corpus() {
    use keyward::audit::{export::event_line, link, Event, NewEvent};
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();

    // eip712: the typed data of every committed EIP-712 vector, compact.
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eip712");
    for path in files(&vectors) {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("vector")).expect("json");
        if let Some(td) = v.get("typed_data").or_else(|| v.get("typedData")) {
            seeds.push(("eip712", serde_json::to_vec(td).expect("json")));
        }
    }

    // jws and jwt_differential: harness-signed (mode byte 3-7) and raw (mode 0) tokens.
    for (mode, signer) in [
        (3u8, Signer::EdDSA),
        (4, Signer::ES256 { high_s: false }),
        (5, Signer::ES256 { high_s: true }),
        (6, Signer::ES256K { high_s: false }),
        (7, Signer::EdDSASmallOrderR),
    ] {
        for (h, p) in [(0, 0), (1, 2), (6, 0), (4, 4), (8, 9), (7, 5)] {
            let mut data = vec![mode];
            if mode == 6 {
                data.push(0);
            }
            data.extend_from_slice(header(HEADERS[h], signer.alg()).as_bytes());
            data.push(0);
            data.extend_from_slice(PAYLOADS[p].as_bytes());
            seeds.push(("jws", data.clone()));
            seeds.push(("jwt_differential", data));
        }
        let token = sign_parts(
            signer,
            header(HEADERS[1], signer.alg()).as_bytes(),
            PAYLOADS[0].as_bytes(),
        );
        for target in ["jws", "jwt_differential"] {
            seeds.push((target, [&[0u8][..], token.as_bytes()].concat()));
        }
    }

    // audit: an export of three chained events and a checkpoint; flags 0 (as is), 1 (relink),
    // 3 (relink and re-sign the checkpoint).
    let mut prev = [0u8; 32];
    let mut lines = Vec::new();
    for seq in 1..=3u64 {
        let body = NewEvent {
            time_ms: 1_700_000_000_000 + seq as i64,
            identity: "spiffe://example.org/marketplace".into(),
            action: "SignPayment".into(),
            account: "acct-1".into(),
            session: "s-1".into(),
            request_id: format!("r-{seq}"),
            decision: "allow".into(),
            policies: vec!["interim:payments".into()],
            code: "OK".into(),
            digest: "ab".repeat(32),
            signature_ref: format!("spend:s-1/r-{seq}"),
            trace_id: if seq == 2 {
                "4bf92f3577b34da6a3ce929d0e0e4736".into()
            } else {
                String::new()
            },
        };
        let hash = link(&prev, seq, &body);
        lines.push(
            event_line(&Event {
                seq,
                body,
                prev_hash: prev,
                hash,
            })
            .expect("line"),
        );
        prev = hash;
    }
    lines.push(format!(
        r#"{{"first_seq":1,"last_seq":3,"root":"{}","created_at":1700000000,"jws":"x.y.z"}}"#,
        "00".repeat(32)
    ));
    for flags in [0u8, 1, 3] {
        seeds.push(("audit", [vec![flags], lines.join("\n").into_bytes()].concat()));
    }

    // eth_recover: raw r||s, a signature made at start or now, its high-s twin, a flipped
    // one; several keys.
    for mode in [0u8, 1, 2, 3, 4, 5, 6, 0x11, 0x22, 0x36] {
        let mut data = vec![mode];
        data.extend((0u8..32).map(|i| i.wrapping_mul(7)));
        if mode % 8 == 0 {
            data.extend([0x42u8; 64]);
        } else if mode % 8 == 3 || mode % 8 == 6 {
            data.extend([0, 0, 1]);
        }
        seeds.push(("eth_recover", data));
    }

    // scope: valid and near-valid scope lists.
    let m = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for text in [
        format!("payments:0-100\nlicense:manifest:{m}"),
        "typed-data:1:0x00000000000000000000000000000000deadbeef\nattest:dataset-1.v2".to_string(),
        "typed-data:137:0x52908400098527886E0F7030069857D2E4169EE7\npayments:5-5".to_string(),
        format!("payments:007-1\nlicense:manifest:{}\nattest:", m.to_uppercase()),
        "payments:340282366920938463463374607431768211455-340282366920938463463374607431768211455".to_string(),
        "payments:1-0\npayments:0-100\npayments:0-100".to_string(),
    ] {
        seeds.push(("scope", text.into_bytes()));
    }

    // tls_identity: generated certificates (mode 1) and one real certificate (mode 0).
    for spec in [
        &b"Uspiffe://example.org/marketplace\0Cmarketplace"[..],
        b"Cspiffe://example.org/admin",
        b"Dspiffe://example.org/admin\0Cadmin",
        b"Uspiffe://example.org/a\0Uspiffe://example.org/admin",
        b"Dclient.example.org\0Ddb.example.org\0Cclient\0cother",
        b"Eops@example.org\0I\x7f\0\0\x01\0Conly-a-cn",
    ] {
        seeds.push(("tls_identity", [&[1u8][..], spec].concat()));
    }
    let (ca, ca_key) = keyward::tls::devpki::new_ca("seed CA").expect("CA");
    let now = time::OffsetDateTime::now_utc();
    let spec = keyward::tls::devpki::CertSpec {
        common_name: "seed".into(),
        uri_sans: vec!["spiffe://example.org/seed".into()],
        dns_sans: vec!["seed.example.org".into()],
        not_before: now - time::Duration::days(1),
        not_after: now + time::Duration::days(365),
        client: true,
        server: false,
    };
    let (pem, _) = keyward::tls::devpki::issue(&ca, &ca_key, &spec).expect("issue");
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    seeds.push(("tls_identity", [&[0u8][..], der.as_ref()].concat()));

    // proto_handler: a well-formed request of every RPC (account id "\0": the harness's first
    // account), as admin and as the marketplace, and bytes that do not decode.
    {
        use keyward::api::pb;
        use prost::Message as _;
        let a = || "\0".to_string();
        let mail = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mail.json"))
            .expect("mail.json");
        let requests: Vec<Vec<u8>> = vec![
            pb::CreateAccountRequest {
                label: "seed".into(),
                controller: fuzzing::PROTO_CONTROLLER.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            pb::GetAccountRequest { account_id: a() }.encode_to_vec(),
            pb::GetAccountJwksRequest { account_id: a() }.encode_to_vec(),
            pb::SignTypedDataRequest {
                account_id: a(),
                typed_data_json: mail,
                ..Default::default()
            }
            .encode_to_vec(),
            pb::SignMessageRequest {
                account_id: a(),
                alg: pb::SignatureAlgorithm::Ed25519 as i32,
                data: b"hello".to_vec(),
            }
            .encode_to_vec(),
            pb::SignPaymentRequest {
                session_token: "x.y.z".into(),
                amount: "10".into(),
                currency: "USD".into(),
                manifest: m.into(),
                license_id: "lic-1".into(),
                payee: "0x52908400098527886E0F7030069857D2E4169EE7".into(),
                request_id: "r-1".into(),
            }
            .encode_to_vec(),
            pb::SignReceiptRequest {
                account_id: a(),
                buyer: "buyer-1".into(),
                amount: "10".into(),
                currency: "USD".into(),
                manifest: m.into(),
                license_id: "lic-1".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            pb::SignAttestationRequest {
                account_id: a(),
                alg: "EdDSA".into(),
                dataset_id: "dataset-1".into(),
                contribution_hash: format!("sha256:{m}"),
                license: "CC-BY-4.0".into(),
                purpose: "training".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            pb::CreateSessionChallengeRequest {
                account_id: a(),
                delegate: "spiffe://example.org/marketplace".into(),
                scopes: vec!["payments:0-100".into()],
                cap: "100".into(),
                ttl_seconds: 600,
            }
            .encode_to_vec(),
            pb::OpenSessionRequest {
                challenge_id: "c-1".into(),
                signature: vec![0x1b; 65],
            }
            .encode_to_vec(),
            pb::GetSessionRequest {
                session_id: "s-1".into(),
            }
            .encode_to_vec(),
            pb::ListSessionsRequest {
                account_id: a(),
                page_size: 10,
                ..Default::default()
            }
            .encode_to_vec(),
            pb::RevokeSessionRequest {
                session_id: "s-1".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            pb::GetJwksRequest {}.encode_to_vec(),
            pb::ListIssuerKeysRequest {}.encode_to_vec(),
            pb::RotateIssuerKeyRequest { alg: "EdDSA".into() }.encode_to_vec(),
            pb::RevokeIssuerKeyRequest {
                kid: "no-such-kid".into(),
            }
            .encode_to_vec(),
        ];
        assert_eq!(requests.len(), fuzzing::PROTO_RPCS);
        for (i, body) in requests.iter().enumerate() {
            let rpc = u8::try_from(i).expect("few RPCs");
            for caller in [0u8, 1] {
                seeds.push(("proto_handler", [&[rpc, caller][..], body].concat()));
            }
        }
        seeds.push(("proto_handler", vec![3, 0, 0x0a, 0xff, 0xff, 0xff]));
    }

    let mut count: HashMap<&str, usize> = HashMap::new();
    for (target, data) in seeds {
        let n = count.entry(target).or_default();
        *n += 1;
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{n:02}")), data).expect("seed");
    }
    eprintln!("{count:?}");
}

/// Why keyward keeps its own verifier for all but the ES256 signature check: jsonwebtoken
/// cannot read a JWKS that publishes keyward's ES256K key, has no ES256K algorithm, and
/// accepts an Ed25519 signature with a small-order R that keyward (`verify_strict`) refuses.
/// If a jsonwebtoken release changes one of these, this fails and the choice is worth
/// revisiting.
#[test]
fn jsonwebtoken_lacks_what_keeps_our_own_verifier() {
    let keys = fixed_keys();
    let jwks = serde_json::json!({ "keys": keys.jwks });
    assert!(serde_json::from_value::<jsonwebtoken::jwk::JwkSet>(jwks).is_err());
    assert!("ES256K".parse::<jsonwebtoken::Algorithm>().is_err());
    let h = header(HEADERS[0], JwsAlg::EdDSA);
    let token = sign_parts(Signer::EdDSASmallOrderR, h.as_bytes(), b"{}");
    assert_eq!(
        differential(&token),
        Outcome::KeywardStricter(Strictness::Ed25519SmallOrderR)
    );
}
