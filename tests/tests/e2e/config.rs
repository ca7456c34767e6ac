//! Configuration mistakes are refused loudly: Envoy does not start with an invalid plugin
//! configuration or without the signing key, a route with invalid metadata answers 500 instead
//! of guessing, and a filter with the wrong key or token stores nothing.

use std::time::Duration;

use serde_json::json;
use signet_e2e::envoy::{Envoy, EnvoySettings};
use signet_e2e::payloads::sample_invoice;
use signet_e2e::{binaries, Stack, StackOptions, Storage};

use crate::assert_error;

const TEST_SEED: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";

/// The filter's variables in Envoy's environment, for an Envoy started alone.
fn filter_env() -> Vec<(String, String)> {
    [
        ("SP_PRIVATE_KEY_B64", TEST_SEED),
        ("SP_KID", "e2e-config"),
        ("SP_FILTER_TOKEN", "e2e-filter-token-config"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec()
}

/// Starts Envoy alone with `plugin_config` and expects it to exit, naming `needle` in its log.
fn assert_envoy_refuses(plugin_config: serde_json::Value, needle: &str) {
    assert_envoy_refuses_with_env(plugin_config, &filter_env(), needle);
}

fn assert_envoy_refuses_with_env(
    plugin_config: serde_json::Value,
    env: &[(String, String)],
    needle: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let settings = EnvoySettings {
        // Nothing listens there: the configuration is refused before any callout.
        control_plane_port: signet_e2e::ports::free_port(),
        control_plane_public_port: signet_e2e::ports::free_port(),
        upstream_port: signet_e2e::ports::free_port(),
        plugin_config: plugin_config.clone(),
        wasm: binaries::filter_wasm(),
        template_edits: Vec::new(),
    };
    let mut envoy = Envoy::spawn(dir.path(), &settings, env);
    let status = envoy.service.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| !s.success()),
        "Envoy started with {plugin_config} ({status:?}):\n{}",
        envoy.service.log_tail()
    );
    let log = envoy.service.log();
    assert!(
        log.lines()
            .any(|line| line.contains("signet") && line.contains(needle)),
        "no filter log line names {needle:?}:\n{}",
        envoy.service.log_tail()
    );
}

#[test]
fn unknown_plugin_config_field_stops_envoy() {
    let plugin_config =
        json!({"control_plane": {"cluster": "signet_control_plane"}, "tenant_cache_ttl": 5});
    assert_envoy_refuses(plugin_config, "invalid plugin configuration");
    assert_envoy_refuses(
        json!({"control_plane": {"cluster": "signet_control_plane"}, "tenant_cache_ttl": 5}),
        "tenant_cache_ttl",
    );
}

#[test]
fn missing_control_plane_cluster_stops_envoy() {
    assert_envoy_refuses(json!({"control_plane": {"timeout_ms": 100}}), "cluster");
}

#[test]
fn out_of_range_plugin_config_value_stops_envoy() {
    assert_envoy_refuses(
        json!({"control_plane": {"cluster": "signet_control_plane", "timeout_ms": 0}}),
        "timeout_ms",
    );
}

#[test]
fn invalid_route_metadata_answers_500_on_that_route_only() {
    let stack = Stack::with_options(StackOptions {
        storage: Storage::Sqlite,
        envoy_template_edits: vec![(
            "inline_body: normalized ".into(),
            "inline_body: sideways ".into(),
        )],
        ..StackOptions::default()
    });
    let r = stack.post_invoice();
    assert_error(&stack, &r, 500, "ROUTE_CONFIG_INVALID");
    assert!(
        stack.envoy.service.log().contains("inline_body"),
        "the log should name the field:\n{}",
        stack.envoy.service.log_tail()
    );
    // The exchange route is configured correctly and still works.
    let ok = stack.exchange(&signet_e2e::payloads::exchange_body(sample_invoice()));
    crate::assert_ok(&stack, &ok);
}

/// envoy/example-existing-config.yaml (the documented way to add Signet to an existing config)
/// is accepted by this Envoy with the real filter, which parses its plugin configuration.
#[test]
fn example_existing_config_validates() {
    let dir = tempfile::tempdir().unwrap();
    let example = binaries::workspace_root().join("envoy/example-existing-config.yaml");
    let text = std::fs::read_to_string(&example).unwrap();
    let wasm_path = "target/wasm32-wasip1/wasm/signet_filter.wasm";
    assert!(text.contains(wasm_path));
    let config = dir.path().join("example.yaml");
    std::fs::write(
        &config,
        text.replace(wasm_path, &binaries::filter_wasm().display().to_string()),
    )
    .unwrap();
    assert_envoy_validates(&config, "example");
}

/// `envoy --mode validate` accepts `config` with the real filter and a signing key.
#[track_caller]
fn assert_envoy_validates(config: &std::path::Path, name: &str) {
    let output = std::process::Command::new(binaries::envoy())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--config-path",
        ])
        .arg(config)
        .env("SP_PRIVATE_KEY_B64", TEST_SEED)
        .env("SP_KID", format!("e2e-{name}"))
        .env("SP_FILTER_TOKEN", format!("e2e-filter-token-{name}"))
        .output()
        .unwrap();
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("OK"),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The signing key reaches the filter only through Envoy's environment: without it, or with a
/// seed that is not 32 bytes of base64url, the filter refuses to start.
#[test]
fn filter_without_a_valid_signing_key_stops_envoy() {
    let plugin_config = signet_e2e::envoy::default_plugin_config();
    let without_key: Vec<_> = filter_env()
        .into_iter()
        .filter(|(name, _)| name != "SP_PRIVATE_KEY_B64")
        .collect();
    assert_envoy_refuses_with_env(plugin_config.clone(), &without_key, "SP_PRIVATE_KEY_B64");
    let mut bad_seed = without_key;
    bad_seed.push(("SP_PRIVATE_KEY_B64".into(), "not-a-seed".into()));
    assert_envoy_refuses_with_env(plugin_config, &bad_seed, "SP_PRIVATE_KEY_B64");
}

/// A filter signing with a key the control plane does not publish gets its receipt refused:
/// the client gets a 500 (a deployment error, not the client's) and nothing is stored or counted.
#[test]
fn receipt_signed_with_an_unknown_key_is_not_stored() {
    let rogue = signet_e2e::stack::TestKey::generate();
    let stack = Stack::with_options(StackOptions {
        envoy_env: vec![
            ("SP_PRIVATE_KEY_B64".into(), rogue.seed_b64url.clone()),
            ("SP_KID".into(), rogue.kid.clone()),
        ],
        ..StackOptions::default()
    });
    let r = stack.exchange(&signet_e2e::payloads::exchange_body(sample_invoice()));
    assert_error(&stack, &r, 500, "RECEIPT_INVALID");
    assert!(
        r.header("X-SIGNET-Receipt-Hash").is_none(),
        "{:?}",
        r.headers
    );
    assert_eq!(stack.vex_count(signet_e2e::stack::DEMO_TENANT), 0);
}

/// The internal API only answers the filter's token.
#[test]
fn filter_with_the_wrong_token_is_refused() {
    let stack = Stack::with_options(StackOptions {
        envoy_env: vec![("SP_FILTER_TOKEN".into(), "not-the-filter-token-0123".into())],
        ..StackOptions::default()
    });
    let r = stack.exchange(&signet_e2e::payloads::exchange_body(sample_invoice()));
    assert_error(&stack, &r, 500, "FILTER_UNAUTHORIZED");
    // Logged at error level for the operator.
    assert!(
        stack
            .envoy
            .service
            .log()
            .lines()
            .any(|l| l.contains("[error]") && l.contains("FILTER_UNAUTHORIZED")),
        "{}",
        stack.envoy.service.log_tail()
    );
    assert_eq!(stack.vex_count(signet_e2e::stack::DEMO_TENANT), 0);
}

/// The Envoy config of docker-compose.yml: the template rendered with exactly the values of
/// Dockerfile.envoy's RUN line (read from that file), accepted by `envoy --mode validate` with
/// the real filter.
#[test]
fn the_compose_envoy_config_validates() {
    let root = binaries::workspace_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile.envoy")).unwrap();
    let run = dockerfile
        .split("\nRUN ")
        .find(|step| step.starts_with("BIND_ADDRESS="))
        .expect("Dockerfile.envoy renders the template in a RUN step");
    let settings: Vec<(String, String)> = run
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(name, _)| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    assert!(settings
        .iter()
        .any(|(n, v)| n == "BIND_ADDRESS" && v == "0.0.0.0"));
    let dir = tempfile::tempdir().unwrap();
    let mut render = std::process::Command::new("sh");
    render.arg(root.join("scripts/render-envoy-config.sh"));
    for (name, value) in &settings {
        render.env(name, value);
    }
    // the image's paths, as files of this checkout
    render
        .env("SIGNET_FILTER_WASM", binaries::filter_wasm())
        .env(
            "SIGNET_ENVOY_TEMPLATE",
            root.join("envoy/signet-local.yaml.tmpl"),
        )
        .env(
            "SIGNET_PLUGIN_CONFIG_FILE",
            root.join("envoy/signet-plugin.json"),
        );
    let rendered = render.output().unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let config = dir.path().join("compose-envoy.yaml");
    std::fs::write(&config, &rendered.stdout).unwrap();
    assert_envoy_validates(&config, "compose");
}
