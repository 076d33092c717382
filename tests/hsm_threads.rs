//! Unwrapped keys dropped on an async worker thread (a cache eviction, the
//! end of a request) are destroyed by the reaper thread, never by a blocking
//! PKCS#11 call on the worker; and they are destroyed.

use keyward::hsm::{Hsm, WrappedRef};
use keyward::testkit::SoftHsmToken;
use keyward::types::KeyAlg;

#[test]
fn keys_dropped_on_a_runtime_are_destroyed_by_the_reaper() {
    let tok = SoftHsmToken::new().expect("token");
    // nextest runs each test in its own process.
    std::env::set_var("SOFTHSM2_CONF", &tok.conf_path);
    let hsm = Hsm::open(&tok.hsm_config(2)).expect("open");
    hsm.ensure_kek().expect("KEK");
    let mut keys = Vec::new();
    for alg in KeyAlg::ALL {
        let w = hsm.generate_wrapped(alg).expect("generate");
        let r = WrappedRef {
            public_key: &w.public_key,
            wrapped: &w.wrapped,
            kek_version: w.kek_version,
        };
        keys.push(hsm.unwrap_for_signing(alg, &r).expect("unwrap"));
    }
    let session_objects = |hsm: &Hsm| {
        hsm.inspect_private_keys()
            .expect("inspect")
            .iter()
            .filter(|o| !o.token)
            .count()
    };
    assert_eq!(session_objects(&hsm), KeyAlg::ALL.len());
    let reaped = keyward::hsm::keys_reaped();

    // A current-thread runtime: its one worker is this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let worker = std::thread::current().id();
        tokio::spawn(async move {
            assert_eq!(std::thread::current().id(), worker);
            drop(keys);
        })
        .await
        .expect("task");
    });
    keyward::hsm::flush_key_destroys();
    assert_eq!(
        keyward::hsm::keys_reaped() - reaped,
        KeyAlg::ALL.len() as u64,
        "destroyed on the reaper thread ({})",
        keyward::hsm::REAPER_THREAD
    );
    assert_eq!(session_objects(&hsm), 0, "every unwrapped key is gone");
    assert_eq!(hsm.pool_in_use(), 0);
}
