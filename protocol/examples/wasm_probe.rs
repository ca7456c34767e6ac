//! A cdylib that uses the protocol crate the way the Envoy filter does (parse, canonicalize, CID,
//! sign, verify, key from the environment), so `tests/wasm_imports.rs` can build it for
//! `wasm32-wasip1` and check that the crate needs no WASI function Envoy lacks.

use signet_protocol::canonical::{self, ParseOptions, Profile};
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{cid, time, Jwks, SigningKey};

/// Lets the host place the input in linear memory before calling [`signet_probe`].
#[no_mangle]
pub extern "C" fn signet_probe_alloc(len: usize) -> *mut u8 {
    let mut buffer = Vec::<u8>::with_capacity(len);
    let ptr = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    ptr
}

/// Receipts the JSON at `ptr..ptr+len` and verifies the receipt; 0 on success.
///
/// # Safety
/// `ptr` must point to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn signet_probe(ptr: *const u8, len: usize) -> i32 {
    let input = std::slice::from_raw_parts(ptr, len);
    match run(input) {
        Ok(()) => 0,
        Err(reason) => {
            eprintln!("signet probe: {reason}");
            1
        }
    }
}

fn run(input: &[u8]) -> Result<(), String> {
    let options = ParseOptions {
        profile: Profile::Signet,
        reject_unsafe_integers: true,
    };
    let payload = canonical::parse(input, &options).map_err(|e| e.to_string())?;
    let canon = canonical::to_canonical(&payload, Profile::Signet).map_err(|e| e.to_string())?;
    // The filter gets its key from Envoy's environment (WASI environ_get).
    let seed = std::env::var("SP_PRIVATE_KEY_B64")
        .unwrap_or_else(|_| "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A".to_owned());
    let key = SigningKey::from_seed_b64url(&seed, "probe").map_err(|e| e.to_string())?;
    let draft = ReceiptDraft {
        trace_id: "probe-1".into(),
        hop: 1,
        ts: time::rfc3339_millis(1_795_626_000_123),
        tenant: "probe".into(),
        cid: cid::cid(canon.as_bytes()),
        canon: Some(canon),
        prev_receipt_hash: None,
        policy: Policy {
            engine: "HEL".into(),
            allowed: true,
            reason: "ok".into(),
        },
        extensions: Default::default(),
    };
    let signed = receipt::sign(&draft, &key).map_err(|e| e.to_string())?;
    let jwks: Jwks = [key.public_jwk()].into_iter().collect();
    receipt::verify(&signed.into(), Some(&jwks), true).map_err(|e| e.to_string())
}
