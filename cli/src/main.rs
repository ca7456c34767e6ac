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
                                         (e.g. a container health check), else 1 with the body
       signet verify-delivery --headers FILE --body FILE --jwks FILE_OR_URL [--url TARGET_URI]
                                         a captured forwarded delivery (SPEC §5): its RFC 9421
                                         signature, Content-Digest and CID; the headers file is
                                         the request line (`POST /path HTTP/1.1`) then `Name: value`
                                         lines, the target URI https://<Host><path> unless --url";

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
        "verify-delivery" => verify_delivery(&mut args),
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

/// `verify-delivery`: the receiver's check of a delivery, with the protocol's one definition of
/// the signature base.
fn verify_delivery(args: &mut lexopt::Parser) -> Result<(), Failure> {
    let (mut headers, mut body, mut jwks, mut url) = (None, None, None, None);
    while let Some(arg) = args.next()? {
        match arg {
            Long("headers") => headers = Some(args.value()?.string()?),
            Long("body") => body = Some(args.value()?.string()?),
            Long("jwks") => jwks = Some(args.value()?.string()?),
            Long("url") => url = Some(args.value()?.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let missing = |what: &str| Failure::Usage(format!("verify-delivery: missing --{what}"));
    let headers = read_input(&headers.ok_or_else(|| missing("headers"))?)?;
    let body = read_input(&body.ok_or_else(|| missing("body"))?)?;
    let jwks = load_jwks(&jwks.ok_or_else(|| missing("jwks"))?)?;
    let text = String::from_utf8(headers)
        .map_err(|_| Failure::Invalid("the headers file is not UTF-8".into()))?;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let mut method = "POST".to_owned();
    let mut path = None;
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        match line.split_once(':') {
            Some((name, value)) if !name.contains(' ') => {
                fields.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            }
            _ => {
                // the request line
                let mut parts = line.split_whitespace();
                method = parts.next().unwrap_or("POST").to_owned();
                path = parts.next().map(str::to_owned);
            }
        }
    }
    let header = |name: &str| {
        let values: Vec<&str> = fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let target = match url {
        Some(url) => url,
        None => {
            let host = header("host").ok_or_else(|| {
                Failure::Usage("verify-delivery: no Host header; give --url".into())
            })?;
            let path = path.ok_or_else(|| {
                Failure::Usage("verify-delivery: no request line; give --url".into())
            })?;
            format!("https://{host}{path}")
        }
    };
    let verified = signet_protocol::http_signature::verify(&method, &target, &header, &body, &jwks)
        .map_err(Failure::Invalid)?;
    if header("x-signet-cid").as_deref() != Some(cid::cid(&body).as_str()) {
        return Err(Failure::Invalid(
            "X-Signet-Cid is not the CID of the body".into(),
        ));
    }
    write_stdout(
        format!(
            "valid (kid {}, created {}, delivery {})\n",
            verified.kid,
            verified.created,
            header("x-signet-delivery").unwrap_or_default()
        )
        .as_bytes(),
    )
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
