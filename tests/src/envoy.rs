//! A real Envoy 1.40 running `envoy/signet-local.yaml.tmpl` with the built filter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::binaries;
use crate::http::Client;
use crate::process::Service;
use crate::prometheus::Metrics;

/// The template shared with `make up` (which renders it with scripts/render-envoy-config.sh).
pub fn template() -> String {
    let path = binaries::workspace_root().join("envoy/signet-local.yaml.tmpl");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The plugin configuration shared with `make up`, as one line of JSON.
pub fn default_plugin_config() -> serde_json::Value {
    let path = binaries::workspace_root().join("envoy/signet-plugin.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Renders the template with scripts/render-envoy-config.sh — the renderer of `make up`,
/// `make bench` and Dockerfile.envoy, so the tests exercise it too — into `dir/envoy.yaml`.
fn render(dir: &Path, settings: &EnvoySettings, port: u16, admin_port: u16) -> PathBuf {
    let mut template = template();
    for (from, to) in &settings.template_edits {
        assert!(
            template.contains(from.as_str()),
            "template edit: {from:?} not in the template"
        );
        template = template.replace(from.as_str(), to);
    }
    let template_path = dir.join("envoy.yaml.tmpl");
    std::fs::write(&template_path, template).expect("write the template");
    let plugin_path = dir.join("signet-plugin.json");
    std::fs::write(&plugin_path, settings.plugin_config.to_string()).expect("write plugin config");

    let script = binaries::workspace_root().join("scripts/render-envoy-config.sh");
    let output = Command::new("sh")
        .arg(&script)
        .env("SIGNET_ENVOY_TEMPLATE", &template_path)
        .env("SIGNET_PLUGIN_CONFIG_FILE", &plugin_path)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("ENVOY_ADMIN_ADDRESS", "127.0.0.1")
        .env("CONTROL_PLANE_HOST", "127.0.0.1")
        .env("UPSTREAM_HOST", "127.0.0.1")
        .env("ENVOY_PORT", port.to_string())
        .env("ENVOY_ADMIN_PORT", admin_port.to_string())
        .env(
            "CONTROL_PLANE_INTERNAL_PORT",
            settings.control_plane_port.to_string(),
        )
        .env(
            "CONTROL_PLANE_PUBLIC_PORT",
            settings.control_plane_public_port.to_string(),
        )
        .env("UPSTREAM_PORT", settings.upstream_port.to_string())
        .env("SIGNET_FILTER_WASM", &settings.wasm)
        .output()
        .expect("run scripts/render-envoy-config.sh");
    assert!(
        output.status.success(),
        "render-envoy-config.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config_path = dir.join("envoy.yaml");
    std::fs::write(&config_path, output.stdout).expect("write envoy.yaml");
    config_path
}

/// What differs between the Envoys of the tests.
#[derive(Clone, Debug)]
pub struct EnvoySettings {
    /// The control plane's internal API (`SP_INTERNAL_PORT`), where the filter's callouts go.
    pub control_plane_port: u16,
    /// The control plane's public API (`PORT`): chains, exports and JWKS through Envoy.
    pub control_plane_public_port: u16,
    pub upstream_port: u16,
    pub plugin_config: serde_json::Value,
    pub wasm: PathBuf,
    /// `(from, to)` text replacements applied to the template, e.g. to change one route's
    /// metadata; each `from` must occur in it.
    pub template_edits: Vec<(String, String)>,
}

pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    pub service: Service,
    pub config_path: PathBuf,
}

impl Envoy {
    /// Writes the config into `dir` and starts Envoy without waiting for it.
    pub fn spawn(dir: &Path, settings: &EnvoySettings, env: &[(String, String)]) -> Envoy {
        let port = crate::ports::free_port();
        let admin_port = crate::ports::free_port();
        let config_path = render(dir, settings, port, admin_port);

        let mut command = Command::new(binaries::envoy());
        command
            .arg("--config-path")
            .arg(&config_path)
            // Several Envoys run at once: no shared-memory hot-restart state between them.
            .arg("--disable-hot-restart")
            // One worker, one Wasm VM: the tests run many stacks on two cores.
            .args(["--concurrency", "1"])
            .args(["--log-level", "info", "--component-log-level", "wasm:debug"])
            // Exactly the filter's variables given here, never ones inherited from the shell.
            .env_remove("SP_PRIVATE_KEY_B64")
            .env_remove("SP_KID")
            .env_remove("SP_FILTER_TOKEN")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let service = Service::spawn("envoy", command, &dir.join("envoy.log"));
        Envoy {
            port,
            admin_port,
            service,
            config_path,
        }
    }

    /// Starts Envoy and waits until its listeners are up.
    pub fn start(dir: &Path, settings: &EnvoySettings, env: &[(String, String)]) -> Envoy {
        let mut envoy = Envoy::spawn(dir, settings, env);
        let client = Client::new();
        let ready_url = envoy.admin_url("/ready");
        envoy.service.wait_until(Duration::from_secs(20), || {
            crate::process::accepts_connections(envoy.admin_port)
                && client.get(&ready_url, &[]).status == 200
        });
        envoy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Stats after the next flush: histograms (`signet_exchange_latency_ms`) reach
    /// `/stats/prometheus` only then (`stats_flush_interval: 1s` in the template).
    pub fn stats_after_flush(&self) -> Metrics {
        std::thread::sleep(Duration::from_millis(1300));
        self.stats()
    }

    /// Polls the stats until `name{labels}` equals `expected` (5 s at most), and returns them.
    pub fn wait_for_stat(&self, name: &str, labels: &[(&str, &str)], expected: f64) -> Metrics {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stats = self.stats();
            let value = stats.value(name, labels);
            if value == expected {
                return stats;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}{labels:?} is {value}, expected {expected}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/stats/prometheus`, where the filter's stats carry the labels set by `stats_tags`.
    pub fn stats(&self) -> Metrics {
        let response = Client::new().get(&self.admin_url("/stats/prometheus"), &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        Metrics::parse(&response.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugin configuration survives the renderer: YAML single quotes doubled, sed's
    /// special characters (| & \) kept literally.
    #[test]
    fn renderer_keeps_the_plugin_configuration_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let plugin_config = serde_json::json!({
            "control_plane": {"cluster": "signet_control_plane"},
            "registry": {"types": {"x.v1": {"schema": {"pattern": "^a|b&c\\d'e$"}}}}
        });
        let settings = EnvoySettings {
            control_plane_port: 1,
            control_plane_public_port: 5,
            upstream_port: 2,
            plugin_config: plugin_config.clone(),
            wasm: PathBuf::from("/nonexistent/signet_filter.wasm"),
            template_edits: Vec::new(),
        };
        let yaml = std::fs::read_to_string(render(dir.path(), &settings, 3, 4)).unwrap();
        let line = yaml
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("value: '"))
            .expect("the configuration line");
        let scalar = &line["value: '".len()..line.len() - 1];
        let decoded: serde_json::Value = serde_json::from_str(&scalar.replace("''", "'")).unwrap();
        assert_eq!(decoded, plugin_config);
        assert!(yaml.contains("port_value: 3") && yaml.contains("port_value: 4"));
        // the admin API on loopback, the callouts to the control plane's internal port
        assert!(
            yaml.contains("{ address: 127.0.0.1, port_value: 4 }"),
            "{yaml}"
        );
        assert!(yaml.contains("port_value: 1 }"), "{yaml}");
        assert!(yaml.contains("filename: /nonexistent/signet_filter.wasm"));
    }

    /// The renderer refuses an Envoy admin address that is not loopback.
    #[test]
    fn renderer_refuses_a_public_admin_address() {
        let script = binaries::workspace_root().join("scripts/render-envoy-config.sh");
        let output = Command::new("sh")
            .arg(&script)
            .env("BIND_ADDRESS", "0.0.0.0")
            .env("ENVOY_ADMIN_ADDRESS", "0.0.0.0")
            .env("CONTROL_PLANE_HOST", "control-plane")
            .env("UPSTREAM_HOST", "demo-upstream")
            .env("ENVOY_PORT", "10000")
            .env("ENVOY_ADMIN_PORT", "9901")
            .env("CONTROL_PLANE_INTERNAL_PORT", "8090")
            .env("CONTROL_PLANE_PUBLIC_PORT", "8088")
            .env("UPSTREAM_PORT", "8089")
            .env("SIGNET_FILTER_WASM", "/x.wasm")
            .output()
            .expect("run scripts/render-envoy-config.sh");
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("not loopback"));
    }
}
