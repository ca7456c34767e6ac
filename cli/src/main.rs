//! `signet`: canonical JSON and CIDs, key generation, and offline verification of receipts,
//! chains and export bundles (SPEC §1–§3). All protocol logic is `signet_protocol`'s.
//!
//! Exit codes: 0 success (`valid`), 1 the input is invalid (one-line reason), 2 usage or I/O error.

use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use lexopt::prelude::*;
use serde_json::json;
use signet_protocol::canonical::{self, ParseOptions, Profile};
use signet_protocol::{bundle, chain, cid, receipt, Jwks, SigningKey};

const USAGE: &str = "\
usage: signet canon [--rfc8785]          canonical JSON of stdin (signet-jcs, or plain RFC 8785)
       signet cid [--rfc8785]            sha256:<hex> CID of stdin's canonical form
       signet keygen [--kid KID]         new Ed25519 seed (base64url) and its public JWK
       signet verify receipt|chain|bundle FILE [--jwks FILE_OR_URL] [--require-sig]
                                         FILE may be - for stdin; prints `valid` or the first failure
       signet health URL                 GET a /healthz URL: exit 0 when it answers 200 `ok`
                                         (e.g. a container health check), else 1 with the body";

/// How a command failed.
enum Failure {
    /// The input is not valid (exit 1).
    Invalid(String),
    /// Bad usage or an I/O problem (exit 2).
    Usage(String),
}

impl From<lexopt::Error> for Failure {
    fn from(err: lexopt::Error) -> Self {
        Failure::Usage(err.to_string())
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(reason)) => {
            eprintln!("{reason}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(reason)) => {
            eprintln!("signet: {reason}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Failure> {
    let mut args = lexopt::Parser::from_env();
    let command = match args.next()? {
        Some(Value(command)) => command.string()?,
        Some(Long("help") | Short('h')) => {
            println!("{USAGE}");
            return Ok(());
        }
        Some(other) => return Err(other.unexpected().into()),
        None => return Err(Failure::Usage("missing command".into())),
    };
    match command.as_str() {
        "canon" => {
            let canonical = canonical_stdin(&mut args)?;
            write_stdout(canonical.as_bytes())
        }
        "cid" => {
            let canonical = canonical_stdin(&mut args)?;
            write_stdout(format!("{}\n", cid::cid(canonical.as_bytes())).as_bytes())
        }
        "keygen" => keygen(&mut args),
        "verify" => verify(&mut args),
        "health" => health(&mut args),
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

/// `canon` and `cid`: one JSON text on stdin, in the chosen profile.
fn canonical_stdin(args: &mut lexopt::Parser) -> Result<String, Failure> {
    let mut profile = Profile::Signet;
    while let Some(arg) = args.next()? {
        match arg {
            Long("rfc8785") => profile = Profile::Rfc8785,
            other => return Err(other.unexpected().into()),
        }
    }
    let input = read_input("-")?;
    canonical::canonicalize(&input, profile)
        .map_err(|e| Failure::Invalid(format!("invalid JSON ({}): {e}", e.code())))
}

fn keygen(args: &mut lexopt::Parser) -> Result<(), Failure> {
    let mut kid = None;
    while let Some(arg) = args.next()? {
        match arg {
            Long("kid") => kid = Some(args.value()?.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| Failure::Usage(format!("no randomness from the OS: {e}")))?;
    let kid = kid.unwrap_or_else(|| default_kid(seed));
    let key = SigningKey::from_seed(seed, kid);
    let output = json!({
        "kid": key.kid(),
        "seed": key.seed_b64url(),
        "jwk": key.public_jwk(),
    });
    let text = serde_json::to_string_pretty(&output)
        .map_err(|e| Failure::Usage(format!("cannot write the key: {e}")))?;
    write_stdout(format!("{text}\n").as_bytes())
}

/// `signet-<12 hex>` from the public key: stable for the key and unlikely to collide.
fn default_kid(seed: [u8; 32]) -> String {
    let x = SigningKey::from_seed(seed, "").public_jwk().x;
    format!("signet-{}", &cid::sha256_hex(x.as_bytes())[..12])
}

#[derive(Clone, Copy)]
enum Document {
    Receipt,
    Chain,
    Bundle,
}

fn verify(args: &mut lexopt::Parser) -> Result<(), Failure> {
    let mut document = None;
    let mut file = None;
    let mut jwks_source = None;
    let mut require_sig = false;
    while let Some(arg) = args.next()? {
        match arg {
            Long("jwks") => jwks_source = Some(args.value()?.string()?),
            Long("require-sig") => require_sig = true,
            Value(value) if document.is_none() => {
                document = Some(match value.string()?.as_str() {
                    "receipt" => Document::Receipt,
                    "chain" => Document::Chain,
                    "bundle" => Document::Bundle,
                    other => {
                        return Err(Failure::Usage(format!(
                            "verify what? expected receipt, chain or bundle, got {other:?}"
                        )))
                    }
                })
            }
            Value(value) if file.is_none() => file = Some(value.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let document =
        document.ok_or_else(|| Failure::Usage("verify: missing receipt|chain|bundle".into()))?;
    let file = file.ok_or_else(|| Failure::Usage("verify: missing FILE".into()))?;
    let jwks = jwks_source.as_deref().map(load_jwks).transpose()?;

    // Strict I-JSON, strings exactly as given: the verifier decides how they were hashed.
    let options = ParseOptions {
        profile: Profile::Rfc8785,
        reject_unsafe_integers: false,
    };
    let value = canonical::parse(&read_input(&file)?, &options).map_err(|e| {
        Failure::Invalid(format!("invalid: {file} is not I-JSON ({}): {e}", e.code()))
    })?;
    let result = match document {
        Document::Receipt => receipt::verify(&value, jwks.as_ref(), require_sig),
        Document::Chain => match value.as_array() {
            Some(receipts) => chain::verify(receipts, jwks.as_ref(), require_sig),
            None => {
                return Err(Failure::Invalid(
                    "invalid: a chain is a JSON array of receipts".into(),
                ))
            }
        },
        Document::Bundle => bundle::verify(&value, jwks.as_ref(), require_sig),
    };
    result.map_err(|e| Failure::Invalid(format!("invalid: {e}")))?;
    if jwks.is_none() {
        eprintln!("note: signatures were not checked (no --jwks)");
    }
    write_stdout(b"valid\n")
}

/// A JWKS from a file or an http(s) URL.
fn load_jwks(source: &str) -> Result<Jwks, Failure> {
    let bytes = if source.starts_with("https://") || source.starts_with("http://") {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .into();
        agent
            .get(source)
            .call()
            .and_then(|mut response| response.body_mut().read_to_vec())
            .map_err(|e| Failure::Usage(format!("cannot fetch the JWKS from {source}: {e}")))?
    } else {
        read_input(source)?
    };
    Jwks::from_json(&bytes).map_err(|e| Failure::Usage(format!("{source}: {e}")))
}

/// `health URL`: a Signet `/healthz` (the control plane's, or Envoy's through the filter).
fn health(args: &mut lexopt::Parser) -> Result<(), Failure> {
    let url = match args.next()? {
        Some(Value(url)) => url.string()?,
        Some(other) => return Err(other.unexpected().into()),
        None => return Err(Failure::Usage("health: missing URL".into())),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .map_err(|e| Failure::Invalid(format!("{url}: {e}")))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| Failure::Invalid(format!("{url}: {e}")))?;
    let ok = serde_json::from_str::<serde_json::Value>(&body)
        .is_ok_and(|health| health["status"] == "ok");
    if status == 200 && ok {
        write_stdout(format!("{}\n", body.trim()).as_bytes())
    } else {
        Err(Failure::Invalid(format!("{url}: {status} {}", body.trim())))
    }
}

/// The bytes of `path`, or of stdin for `-`.
fn read_input(path: &str) -> Result<Vec<u8>, Failure> {
    let mut bytes = Vec::new();
    let read = if path == "-" {
        io::stdin().lock().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::read(path).map(|content| bytes = content)
    };
    read.map_err(|e| Failure::Usage(format!("cannot read {path}: {e}")))?;
    Ok(bytes)
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Usage(format!("cannot write to stdout: {e}")))
}
