//! HEL egress policy (SPEC §5), the part decided before any DNS resolution. It lives in
//! `signet_protocol::hel` because the control plane checks a `forward_url` again, by the same
//! rules, before it delivers.

pub use signet_protocol::hel::*;
