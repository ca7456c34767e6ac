//! The shipped deployment files (#13 item 15): what they promise is checked against the files
//! and the built filter, since no Kubernetes or Docker runs here.

use std::process::Command;

use signet_e2e::binaries;

fn read(path: &str) -> String {
    let path = binaries::workspace_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Lines that are not YAML/shell comments.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| !l.trim_start().starts_with('#'))
}

/// scripts/istio-wasmplugin.sh pins the WasmPlugin to the SHA-256 of the built .wasm.
#[test]
fn the_istio_wasmplugin_is_pinned_to_the_built_filter() {
    let wasm = binaries::filter_wasm();
    let script = binaries::workspace_root().join("scripts/istio-wasmplugin.sh");
    let output = Command::new("sh")
        .arg(&script)
        .arg(&wasm)
        .output()
        .expect("run scripts/istio-wasmplugin.sh");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest = String::from_utf8(output.stdout).unwrap();
    let bytes = std::fs::read(&wasm).unwrap();
    let digest = signet_protocol::cid::cid(&bytes);
    let expected = format!("  sha256: {}", digest.trim_start_matches("sha256:"));
    assert_eq!(
        code_lines(&manifest)
            .filter(|l| l.starts_with("  sha256: "))
            .collect::<Vec<_>>(),
        vec![expected.as_str()]
    );
    // the callouts go to the control plane's internal port
    assert!(
        manifest.contains("cluster: outbound|8090||signet-control-plane.signet.svc.cluster.local")
    );
    // unpinned, the file itself does not apply
    assert!(read("envoy/istio/wasmplugin.yaml").contains("sha256: SHA256_OF_SIGNET_FILTER_WASM"));
}

/// Only the filter's workloads reach the internal port, and the Service serves it.
#[test]
fn the_control_planes_internal_port_is_for_the_sidecars_only() {
    let service = read("envoy/istio/control-plane.yaml");
    assert!(service.contains("port: 8090") && service.contains("SP_INTERNAL_PORT"));
    let policy = read("envoy/istio/authorizationpolicy.yaml");
    let policy: Vec<&str> = code_lines(&policy).map(str::trim).collect();
    for line in [
        "action: ALLOW",
        "principals: [\"cluster.local/ns/invoices/sa/invoices\"]",
        "ports: [\"8090\"]",
        "mode: STRICT # without mTLS there is no principal to check",
    ] {
        assert!(policy.contains(&line), "{line} not in the policy");
    }
    // the internal port appears in exactly one rule, the one with the principal
    let rules = policy.join("\n");
    assert_eq!(rules.matches("\"8090\"").count(), 1);
    let rule = rules.split("- from:").nth(1).unwrap_or_default();
    assert!(rule.contains("principals") && rule.contains("\"8090\""));
}

/// Envoy's admin never listens on every interface, and compose has no fixed API key.
#[test]
fn shipped_configs_expose_no_admin_and_no_demo_key() {
    let dockerfile = read("Dockerfile.envoy");
    assert!(dockerfile.contains("ENVOY_ADMIN_ADDRESS=127.0.0.1"));
    assert!(!code_lines(&dockerfile).any(|l| l.contains("EXPOSE") && l.contains("9901")));
    let compose = read("docker-compose.yml");
    assert!(!code_lines(&compose).any(|l| l.contains("demo-key") || l.contains(":9901")));
    assert!(compose.contains("SP_API_KEYS: ${SP_API_KEYS:?"));
    let template = read("envoy/signet-local.yaml.tmpl");
    assert!(template.contains("address: ${ENVOY_ADMIN_ADDRESS}, port_value: ${ENVOY_ADMIN_PORT}"));
}

/// `make up` tells the truth: a service that cannot start stops the script with the reason
/// from its own log on the terminal, not only "see the logs". Here the control plane on
/// PostgreSQL without `SP_POSTGRES_URL`, started by scripts/stack.sh as `make up` starts it.
#[test]
fn the_stack_script_prints_why_a_service_did_not_start() {
    let run = tempfile::tempdir().expect("temp dir");
    let bin = binaries::control_plane();
    let bin_dir = bin.parent().expect("the binaries' directory");
    let port = || signet_e2e::ports::free_port().to_string();
    let script = format!(
        "source {}/scripts/stack.sh && BIN={} && stack_secrets && stack_start",
        binaries::workspace_root().display(),
        bin_dir.display()
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .env("SIGNET_RUN", run.path())
        .env("SIGNET_DATA", run.path().join("data"))
        .env("SP_STORAGE", "postgres")
        .env_remove("SP_POSTGRES_URL")
        .env("ENVOY_PORT", port())
        .env("ENVOY_ADMIN_PORT", port())
        .env("CONTROL_PLANE_PORT", port())
        .env("CONTROL_PLANE_INTERNAL_PORT", port())
        .env("CONTROL_PLANE_ADMIN_PORT", port())
        .env("UPSTREAM_PORT", port())
        .output()
        .expect("run scripts/stack.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("control plane exited (status 1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("SP_POSTGRES_URL: required when SP_STORAGE=postgres"),
        "the reason is on the terminal:\n{stderr}"
    );
}
