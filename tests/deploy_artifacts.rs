//! The deployment artifacts (`deploy/container/`, `deploy/compose/`,
//! `deploy/kubernetes/`) keep their promises, and stay in step with the
//! daemon: no network, no container runtime, no cluster.
//!
//! - the configs they ship (`deploy/compose/keyward.toml`, and the
//!   keyward.toml embedded in `deploy/kubernetes/configmap.yaml`) pass
//!   keyward's own validation (`Config::parse`: every key known, every bound
//!   held; files are not opened, they exist only in the containers);
//! - the probes ask for `/healthz` and `/readyz` over HTTPS on the port the
//!   config's `server.https_listen` names, and those routes exist in
//!   `src/http.rs`; the Service, the NetworkPolicy and the compose ports name
//!   ports the config listens on;
//! - the paths the configs name (PIN file, TLS files, softhsm2.conf, token
//!   folder, PGPASSFILE) are the ones the init steps write or the volumes
//!   mount;
//! - the runtime image runs as a non-root numeric user, has no RUN step (its
//!   base has no shell) and an exec-form ENTRYPOINT; every file the
//!   Dockerfile copies from the build context exists and is let through by
//!   its ignore file;
//! - the hardening settings are present (securityContext, compose's
//!   read_only, cap_drop, no-new-privileges) and kustomization.yaml lists
//!   every manifest but the example Secrets.
//!
//! YAML is read line by line (the project has no YAML parser): the
//! manifests keep one key per line, and flow mappings only on one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keyward::config::{Config, MetricsListen};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The block scalar under `key: |` in `text`: its lines, de-indented.
fn block_scalar(text: &str, key: &str) -> String {
    let mut lines = text.lines();
    let header = format!("{key}: |");
    lines
        .by_ref()
        .find(|l| l.trim() == header)
        .unwrap_or_else(|| panic!("no `{header}` block"));
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
        .collect();
    let body: Vec<&str> = body.iter().map(|l| l.strip_prefix("    ").unwrap_or("")).collect();
    body.join("\n").trim_end().to_string() + "\n"
}

fn k8s_config() -> Config {
    let text = block_scalar(&read("deploy/kubernetes/configmap.yaml"), "keyward.toml");
    Config::parse(&text, Path::new("/etc/keyward")).unwrap_or_else(|e| panic!("configmap keyward.toml: {e}"))
}

fn compose_config() -> Config {
    let text = read("deploy/compose/keyward.toml");
    Config::parse(&text, Path::new("/etc/keyward")).unwrap_or_else(|e| panic!("compose keyward.toml: {e}"))
}

/// Lines of `text` with comments and surrounding blanks removed.
fn code_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn assert_has(text: &str, needle: &str, what: &str) {
    assert!(
        code_lines(text).iter().any(|l| l.contains(needle)),
        "{what}: no line with `{needle}`"
    );
}

fn count(text: &str, needle: &str) -> usize {
    code_lines(text).iter().filter(|l| l.contains(needle)).count()
}

/// `name: N` of `containerPort` entries in deployment.yaml's flow mappings.
fn container_port(deployment: &str, name: &str) -> u16 {
    let key = format!("name: {name}, containerPort: ");
    let line = code_lines(deployment)
        .into_iter()
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("deployment.yaml: no container port named {name}"));
    let rest = &line[line.find(&key).unwrap() + key.len()..];
    rest.split(',').next().unwrap().trim().parse().expect("a port number")
}

fn metrics_addr(cfg: &Config) -> SocketAddr {
    match cfg.server.metrics_listen {
        MetricsListen::At(a) => a,
        MetricsListen::Off => panic!("metrics_listen is off"),
    }
}

#[test]
fn shipped_configs_pass_keywards_validation() {
    for (what, cfg) in [("kubernetes", k8s_config()), ("compose", compose_config())] {
        assert!(
            cfg.store.url.starts_with("postgres://"),
            "{what}: replicas share a PostgreSQL store, not {}",
            cfg.store.url
        );
        let userinfo = cfg.store.url["postgres://".len()..].split('@').next().unwrap();
        assert!(
            !userinfo.contains(':'),
            "{what}: no password in store.url (PGPASSFILE carries it)"
        );
        assert!(
            cfg.hsm.pin_env.is_none() && cfg.hsm.pin_file.is_some(),
            "{what}: PIN from a file"
        );
        // Reachable by the scraper (in the pod network / compose network).
        assert!(
            metrics_addr(&cfg).ip().is_unspecified(),
            "{what}: metrics listen on all addresses"
        );
        assert_ne!(cfg.server.listen.port(), cfg.server.https_listen.port());
        assert_eq!(
            cfg.policy.dir,
            Path::new("/etc/keyward/policies"),
            "{what}: the image's policy set"
        );
        assert_eq!(cfg.hsm.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
    }
}

#[test]
fn probes_ask_the_https_side_port_for_routes_the_daemon_serves() {
    let http = read("src/http.rs");
    for route in ["/healthz", "/readyz"] {
        assert!(
            http.contains(&format!(".route(\"{route}\"")),
            "src/http.rs serves no {route}"
        );
    }
    let cfg = k8s_config();
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert_eq!(container_port(&deployment, "https"), cfg.server.https_listen.port());
    assert_eq!(container_port(&deployment, "grpc"), cfg.server.listen.port());
    assert_eq!(container_port(&deployment, "metrics"), metrics_addr(&cfg).port());
    for (probe, path) in [
        ("readinessProbe:", "/readyz"),
        ("livenessProbe:", "/healthz"),
        ("startupProbe:", "/healthz"),
    ] {
        let lines = code_lines(&deployment);
        let at = lines
            .iter()
            .position(|l| l == probe)
            .unwrap_or_else(|| panic!("deployment.yaml: no {probe}"));
        let get = &lines[at + 1];
        assert_eq!(
            get,
            &format!("httpGet: {{ path: {path}, port: https, scheme: HTTPS }}"),
            "{probe}"
        );
    }
    // The Service and the NetworkPolicy name the ports by their names.
    let service = read("deploy/kubernetes/service.yaml");
    for (name, port) in [
        ("grpc", cfg.server.listen.port()),
        ("https", cfg.server.https_listen.port()),
        ("metrics", metrics_addr(&cfg).port()),
    ] {
        assert_has(&service, &format!("targetPort: {name}"), "service.yaml");
        assert_has(&service, &format!("port: {port}"), "service.yaml");
    }
    let netpol = read("deploy/kubernetes/networkpolicy.yaml");
    for name in ["grpc", "https", "metrics"] {
        assert_has(&netpol, &format!("- port: {name}"), "networkpolicy.yaml");
    }
    assert_has(&netpol, "policyTypes: [Ingress, Egress]", "networkpolicy.yaml");

    // Compose publishes the config's gRPC and HTTPS ports.
    let compose = read("deploy/compose/compose.yaml");
    let ccfg = compose_config();
    assert_has(
        &compose,
        &format!(":{}\"", ccfg.server.listen.port()),
        "compose.yaml ports",
    );
    assert_has(
        &compose,
        &format!(":{}\"", ccfg.server.https_listen.port()),
        "compose.yaml ports",
    );
}

#[test]
fn kubernetes_paths_agree_between_config_volumes_and_init_container() {
    let cfg = k8s_config();
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let configmap = read("deploy/kubernetes/configmap.yaml");
    let conf = cfg.hsm.softhsm_conf.clone().expect("hsm.softhsm_conf");
    assert_has(
        &deployment,
        &format!("mountPath: {}, subPath: softhsm2.conf", conf.display()),
        "deployment.yaml",
    );
    assert_has(
        &deployment,
        "mountPath: /etc/keyward/keyward.toml, subPath: keyward.toml",
        "deployment.yaml",
    );
    let softhsm = block_scalar(&configmap, "softhsm2.conf");
    let tokendir = softhsm
        .lines()
        .find_map(|l| l.strip_prefix("directories.tokendir = "))
        .expect("tokendir")
        .trim()
        .to_string();
    assert_has(&deployment, &format!("-C {tokendir} --no-same-owner"), "init container");
    // Files keyward reads are the init container's copies, in the volume
    // mounted at /run/keyward.
    let pin = cfg.hsm.pin_file.clone().unwrap();
    let copied = [
        pin.clone(),
        cfg.tls.cert.clone(),
        cfg.tls.key.clone(),
        cfg.tls.client_ca.clone(),
    ];
    for path in &copied {
        assert!(path.starts_with("/run/keyward"), "{} is not a copy", path.display());
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            code_lines(&deployment)
                .iter()
                .any(|l| l.starts_with("install -m 0") && l.contains(&name)),
            "the init container does not install {name}"
        );
    }
    assert_has(
        &deployment,
        &format!("install -m 0400 /etc/keyward/secret-pin/hsm-pin {}", pin.display()),
        "PIN copy",
    );
    assert_has(
        &deployment,
        &format!(
            "install -m 0600 /etc/keyward/secret-tls/server-key.pem {}",
            cfg.tls.key.display()
        ),
        "key copy",
    );
    let lines = code_lines(&deployment);
    let at = lines
        .iter()
        .position(|l| l == "- name: PGPASSFILE")
        .expect("PGPASSFILE");
    let pgpass = lines[at + 1].strip_prefix("value: ").expect("PGPASSFILE value");
    assert_has(&deployment, &format!("pgpass {pgpass}"), "pgpass copy");
}

#[test]
fn compose_paths_agree_between_config_secrets_and_init_job() {
    let cfg = compose_config();
    let compose = read("deploy/compose/compose.yaml");
    let init = read("deploy/compose/init.sh");
    let pin = cfg.hsm.pin_file.clone().unwrap();
    let secret = pin
        .strip_prefix("/run/secrets")
        .expect("a compose secret")
        .to_string_lossy()
        .to_string();
    assert_has(&compose, &format!("{secret}:"), "compose.yaml secrets");
    assert_has(
        &compose,
        &format!("secrets: [{secret}, pgpass]"),
        "keyward service secrets",
    );
    let conf = cfg.hsm.softhsm_conf.clone().expect("hsm.softhsm_conf");
    assert_has(&init, &format!("--softhsm-conf {}", conf.display()), "init.sh");
    assert_has(&init, "--config /etc/keyward/keyward.toml", "init.sh");
    assert_has(&init, "--token-dir /var/lib/keyward/tokens", "init.sh");
    assert!(
        conf.starts_with("/var/lib/keyward"),
        "softhsm2.conf in the shared state volume"
    );
    assert_has(&compose, "- state:/var/lib/keyward", "compose.yaml volumes");
    assert_has(
        &compose,
        "./keyward.toml:/etc/keyward/keyward.toml:ro",
        "compose.yaml config mount",
    );
    for path in [&cfg.tls.cert, &cfg.tls.key, &cfg.tls.client_ca] {
        assert!(path.starts_with("/etc/keyward/tls"), "{}", path.display());
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            init.contains(&name.replace(".pem", "")),
            "init.sh does not write {name}"
        );
    }
    assert_has(&compose, "PGPASSFILE: /run/secrets/pgpass", "compose.yaml");
}

#[test]
fn the_runtime_image_is_non_root_shell_free_and_copies_only_what_exists() {
    let dockerfile = read("deploy/container/Dockerfile");
    let lines = code_lines(&dockerfile);
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 4, "build, softhsm, init, runtime stages");
    let last = &lines[*stages.last().unwrap()..];
    assert!(
        last[0].ends_with(" AS runtime"),
        "the runtime stage is the default (last) target"
    );
    assert!(last[0].contains("${RUNTIME_IMAGE}"));
    assert_has(
        &dockerfile,
        "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot",
        "Dockerfile",
    );
    assert!(
        !last.iter().any(|l| l.starts_with("RUN ") || l.starts_with("SHELL ")),
        "the runtime stage must not need a shell"
    );
    let user = last
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("a numeric USER");
    assert_ne!(uid, 0, "runtime USER must not be root");
    assert_eq!(uid, 65532, "the uid compose and Kubernetes run as");
    assert!(last.contains(&"ENTRYPOINT [\"/usr/local/bin/keyward\"]".to_string()));
    assert!(last.contains(&"CMD [\"serve\", \"--config\", \"/etc/keyward/keyward.toml\"]".to_string()));
    assert_has(
        &dockerfile,
        "cargo build --release --locked --bin keyward",
        "build stage",
    );
    assert!(
        !last.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "no shell or client to run one"
    );
    for stage in ["AS build", "AS softhsm", "AS init"] {
        assert!(
            lines.iter().any(|l| l.starts_with("FROM ") && l.ends_with(stage)),
            "{stage}"
        );
    }

    // Every build-context COPY source exists and passes the ignore file.
    let ignore = read("deploy/container/Dockerfile.dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(
        code_lines(&ignore).first().map(String::as_str) == Some("*"),
        "allow-list ignore file"
    );
    let mut sources = 0;
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let words: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            let src = src.trim_end_matches('/');
            assert!(
                root().join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
            assert!(
                allowed.iter().any(|a| src == *a || src.starts_with(&format!("{a}/"))),
                "Dockerfile copies {src}, which the ignore file keeps out"
            );
            sources += 1;
        }
    }
    assert!(sources >= 8, "COPY lines read: {sources}");
    // The init stage carries the compose init script and init-token.sh.
    assert_has(
        &dockerfile,
        "COPY deploy/compose/init.sh /opt/keyward/compose-init.sh",
        "init stage",
    );
    let compose = read("deploy/compose/compose.yaml");
    assert_has(
        &compose,
        "entrypoint: [\"/opt/keyward/compose-init.sh\"]",
        "compose init",
    );
}

#[test]
fn hardening_settings_are_present() {
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert_has(&deployment, "replicas: 3", "deployment.yaml");
    assert_has(&deployment, "runAsNonRoot: true", "deployment.yaml");
    assert_has(&deployment, "runAsUser: 65532", "deployment.yaml");
    assert_has(&deployment, "type: RuntimeDefault", "deployment.yaml");
    assert_has(&deployment, "automountServiceAccountToken: false", "deployment.yaml");
    assert_has(&deployment, "topologyKey: kubernetes.io/hostname", "deployment.yaml");
    // Both the init container and keyward.
    for key in [
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [ALL]",
    ] {
        assert_eq!(
            count(&deployment, key),
            2,
            "deployment.yaml: `{key}` in both containers"
        );
    }
    assert_eq!(
        count(&deployment, "medium: Memory"),
        3,
        "token, secrets and /tmp in memory"
    );
    assert!(
        !code_lines(&deployment)
            .iter()
            .any(|l| l.contains("privileged: true") || l.contains("hostPath")),
        "no privileged container, no hostPath"
    );
    assert_has(&read("deploy/kubernetes/pdb.yaml"), "minAvailable: 2", "pdb.yaml");
    assert_has(
        &read("deploy/kubernetes/namespace.yaml"),
        "pod-security.kubernetes.io/enforce: restricted",
        "namespace.yaml",
    );

    let compose = read("deploy/compose/compose.yaml");
    for key in [
        "read_only: true",
        "user: \"65532:65532\"",
        "cap_drop: [ALL]",
        "security_opt: [\"no-new-privileges:true\"]",
        "replicas: 3",
        "condition: service_completed_successfully",
        "condition: service_healthy",
        "<<: *hardening",
    ] {
        assert_has(&compose, key, "compose.yaml");
    }
    assert_eq!(count(&compose, "<<: *hardening"), 2, "init and keyward are hardened");

    // kustomization lists every manifest except the example Secrets.
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    let listed: Vec<String> = code_lines(&kustomization)
        .iter()
        .filter_map(|l| l.strip_prefix("- ").map(str::to_string))
        .filter(|l| l.ends_with(".yaml"))
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml" && n != "secret.example.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, present, "kustomization.yaml resources");
    assert!(
        !listed.iter().any(|l| l.contains("secret")),
        "example Secrets are never applied"
    );
}
