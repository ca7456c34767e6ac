//! The protocol crate must run inside Envoy's Wasm VM, whose WASI host implements only part of
//! `wasi_snapshot_preview1` (older Envoy builds in Istio lack `sched_yield` and `poll_oneoff`).
//! This test builds `examples/wasm_probe.rs` for `wasm32-wasip1` and checks every import of the
//! module; it checks the filter artifact too when `SIGNET_FILTER_WASM` names it.

use std::path::{Path, PathBuf};
use std::process::Command;

use wasmparser::{Parser, Payload};

/// The `wasi_snapshot_preview1` functions Envoy's host provides.
const ENVOY_WASI: [&str; 14] = [
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_time_get",
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "proc_exit",
    "random_get",
];

fn allowed(module: &str, name: &str) -> bool {
    match module {
        "env" => name.starts_with("proxy_"),
        "wasi_snapshot_preview1" => ENVOY_WASI.contains(&name),
        _ => false,
    }
}

/// Every import of `wasm` as `module.name`.
fn imports(wasm: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::ImportSection(section) = payload.expect("a valid wasm module") {
            for import in section.into_imports() {
                let import = import.expect("a valid import");
                found.push(format!("{}.{}", import.module, import.name));
            }
        }
    }
    found
}

/// The imports of `wasm` that Envoy's host does not provide.
fn disallowed_imports(wasm: &[u8]) -> Vec<String> {
    imports(wasm)
        .into_iter()
        .filter(|import| {
            let (module, name) = import.split_once('.').unwrap_or((import, ""));
            !allowed(module, name)
        })
        .collect()
}

fn build_probe() -> PathBuf {
    // A target dir of its own: the outer `cargo test` holds the lock of the test's target dir.
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("wasm-probe");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--example",
            "wasm_probe",
            "--target",
            "wasm32-wasip1",
        ])
        // The profile the filter ships with (size-optimized, panic = abort).
        .args(["--profile", "wasm", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the wasm probe failed");
    target_dir.join("wasm32-wasip1/wasm/examples/wasm_probe.wasm")
}

#[test]
fn probe_imports_only_what_envoy_provides() {
    let wasm = std::fs::read(build_probe()).expect("the probe was built");
    let all = imports(&wasm);
    // The probe reads the signing key from the environment as the filter does.
    assert!(
        all.iter()
            .any(|import| import == "wasi_snapshot_preview1.environ_get"),
        "{all:?}"
    );
    assert_eq!(
        disallowed_imports(&wasm),
        Vec::<String>::new(),
        "all imports: {all:?}"
    );
}

/// Runs the probe under Node's WASI (when `node` is installed): receipts and verifies inputs in
/// wasm, including nesting at the limit, which must neither overflow the stack nor be accepted
/// one level deeper.
#[test]
fn probe_runs_in_a_wasi_host() {
    const RUNNER: &str = r#"
        const { WASI } = require("node:wasi");
        const wasi = new WASI({ version: "preview1", env: {}, args: [] });
        const module = new WebAssembly.Module(require("fs").readFileSync(process.argv[1]));
        const instance = new WebAssembly.Instance(module, wasi.getImportObject());
        wasi.initialize({ exports: { memory: instance.exports.memory } });
        const run = (text) => {
            const bytes = Buffer.from(text, "utf8");
            const ptr = instance.exports.signet_probe_alloc(bytes.length);
            new Uint8Array(instance.exports.memory.buffer, ptr, bytes.length).set(bytes);
            return instance.exports.signet_probe(ptr, bytes.length);
        };
        const deep = (n) => "[".repeat(n) + "]".repeat(n);
        console.log(JSON.stringify([
            run('{"b":1,"a":"cafe\u0301","n":[1e-7,0.1,-0]}'),
            run(deep(1024)),
            run('{"a":'.repeat(1024) + "1" + "}".repeat(1024)),
            run(deep(1025)),
            run('{"a":1,"a":2}'),
            run('["\\ud800"]'),
            run('[1e21]'),
        ]));
    "#;
    let probe = build_probe();
    let Ok(output) = Command::new("node")
        .args(["--no-warnings", "-e", RUNNER])
        .arg(&probe)
        .output()
    else {
        eprintln!("node is not installed: the probe is only built, not run");
        return;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // the last: an integer beyond 2^53 is refused in the pipeline's strict mode (SPEC §1)
    assert_eq!(stdout.trim(), "[0,0,0,1,1,1,1]");
}

#[test]
fn filter_artifact_imports_only_what_envoy_provides() {
    let Ok(path) = std::env::var("SIGNET_FILTER_WASM") else {
        eprintln!("SIGNET_FILTER_WASM is not set: only the probe is checked");
        return;
    };
    let wasm = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    assert!(
        imports(&wasm).iter().any(|i| i.starts_with("env.proxy_")),
        "{path} is not a proxy-wasm module"
    );
    assert_eq!(disallowed_imports(&wasm), Vec::<String>::new(), "{path}");
}

/// A module importing `imports` (as functions of type `() -> ()`), assembled by hand.
fn module_importing(imports: &[(&str, &str)]) -> Vec<u8> {
    fn name(out: &mut Vec<u8>, s: &str) {
        out.push(u8::try_from(s.len()).unwrap());
        out.extend_from_slice(s.as_bytes());
    }
    let mut section = vec![u8::try_from(imports.len()).unwrap()];
    for (module, item) in imports {
        name(&mut section, module);
        name(&mut section, item);
        section.extend_from_slice(&[0x00, 0x00]); // a function of type 0
    }
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type 0: () -> ()
    wasm.push(0x02);
    // Section size as unsigned LEB128.
    let mut size = section.len();
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            wasm.push(byte);
            break;
        }
        wasm.push(byte | 0x80);
    }
    wasm.extend_from_slice(&section);
    wasm
}

#[test]
fn checker_flags_what_envoy_lacks() {
    let wasm = module_importing(&[
        ("env", "proxy_log"),
        ("wasi_snapshot_preview1", "fd_write"),
        ("wasi_snapshot_preview1", "sched_yield"),
        ("wasi_snapshot_preview1", "poll_oneoff"),
        ("env", "memcpy"),
        ("wasi", "random_get"),
    ]);
    assert_eq!(imports(&wasm).len(), 6);
    assert_eq!(
        disallowed_imports(&wasm),
        [
            "wasi_snapshot_preview1.sched_yield",
            "wasi_snapshot_preview1.poll_oneoff",
            "env.memcpy",
            "wasi.random_get"
        ]
    );
}
