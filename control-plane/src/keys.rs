//! The signing key and the JWKS of every kid ever used (SPEC §3: rotation keeps old kids).
//!
//! Each configured public key (the current one and `SP_PREVIOUS_JWKS`) is recorded in the
//! database under its kid at start; the JWKS is everything recorded, the current kid first. A
//! kid once recorded can never name another key.

use signet_protocol::keys::{Jwk, Jwks, SigningKey};

use crate::storage::{Storage, StoreError};

pub struct KeyRing {
    signing: SigningKey,
    jwks: Jwks,
    jwks_json: String,
}

#[derive(Debug)]
pub enum KeyRingError {
    /// The kid was recorded earlier with another public key.
    KidReused {
        variable: &'static str,
        kid: String,
    },
    Store(StoreError),
}

impl std::fmt::Display for KeyRingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyRingError::KidReused { variable, kid } => write!(
                f,
                "invalid configuration: {variable}: kid {kid:?} already names another public key in the database; give the new key a new kid"
            ),
            KeyRingError::Store(e) => write!(f, "cannot load the signing keys: {e}"),
        }
    }
}

impl std::error::Error for KeyRingError {}

impl KeyRing {
    pub async fn load(
        storage: &dyn Storage,
        signing: SigningKey,
        previous: Vec<Jwk>,
    ) -> Result<Self, KeyRingError> {
        let current = signing.public_jwk();
        let configured = std::iter::once(("SP_KID", current.clone()))
            .chain(previous.into_iter().map(|k| ("SP_PREVIOUS_JWKS", k)));
        for (variable, jwk) in configured {
            let json = serde_json::to_string(&jwk).map_err(|e| {
                KeyRingError::Store(StoreError::Corrupt(format!("JWK does not serialize: {e}")))
            })?;
            let stored = storage
                .remember_signing_key(&jwk.kid, &json)
                .await
                .map_err(KeyRingError::Store)?;
            if serde_json::from_str::<Jwk>(&stored).ok().as_ref() != Some(&jwk) {
                return Err(KeyRingError::KidReused {
                    variable,
                    kid: jwk.kid,
                });
            }
        }
        let mut keys = vec![current.clone()];
        for json in storage.signing_keys().await.map_err(KeyRingError::Store)? {
            let jwk: Jwk = serde_json::from_str(&json).map_err(|e| {
                KeyRingError::Store(StoreError::Corrupt(format!("signing_keys: {e}")))
            })?;
            if jwk.kid != current.kid {
                keys.push(jwk);
            }
        }
        let jwks: Jwks = keys.into_iter().collect();
        let jwks_json = jwks.to_json();
        Ok(Self {
            signing,
            jwks,
            jwks_json,
        })
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn jwks(&self) -> &Jwks {
        &self.jwks
    }

    /// The `/.well-known/jwks.json` document.
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }
}
