//! Secrets at rest: AES-256-GCM for codes and API secrets, a keyed hash for finding
//! duplicate codes without decrypting, and a keyed permutation for public identifiers
//! of internal row numbers.
//!
//! Every key is derived from `CARDGATE_MASTER_KEY` with HKDF, so the master key itself
//! is never used directly and one key's compromise does not give another.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::cipher::BlockEncrypt;
use aes_gcm::aes::Aes256;
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const NONCE_BYTES: usize = 12;

pub struct Crypto {
    cipher: Aes256Gcm,
    code_mac: Hmac<Sha256>,
    ids: Aes256,
}

#[derive(Debug, thiserror::Error)]
#[error("ciphertext could not be decrypted")]
pub struct DecryptError;

/// What a ciphertext is bound to (AES-GCM associated data), so that a ciphertext moved
/// from one place to another does not decrypt there.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    /// A card code of this product.
    Code { product_id: i64 },
    /// An API key's secret.
    ApiSecret { key_id: &'a str },
    /// A reseller's webhook secret.
    WebhookSecret { reseller_id: &'a str },
    /// A position in this reseller's statement (its `next_cursor`).
    StatementCursor { reseller: i64 },
    /// A supplier's API secret (docs/api.md §8).
    SupplierSecret { supplier_id: &'a str },
}

impl Purpose<'_> {
    fn aad(&self) -> Vec<u8> {
        match self {
            Purpose::Code { product_id } => format!("code:{product_id}").into_bytes(),
            Purpose::ApiSecret { key_id } => format!("api-secret:{key_id}").into_bytes(),
            Purpose::WebhookSecret { reseller_id } => format!("webhook-secret:{reseller_id}").into_bytes(),
            Purpose::StatementCursor { reseller } => format!("statement-cursor:{reseller}").into_bytes(),
            Purpose::SupplierSecret { supplier_id } => format!("supplier-secret:{supplier_id}").into_bytes(),
        }
    }
}

impl Crypto {
    pub fn new(master_key: &[u8; 32]) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"cardgate/v1"), master_key);
        let mut enc = [0u8; 32];
        let mut mac = [0u8; 32];
        let mut ids = [0u8; 32];
        // Output lengths of 32 bytes are far below HKDF-SHA256's limit.
        hk.expand(b"aes-256-gcm", &mut enc).expect("32-byte HKDF output");
        hk.expand(b"code-hash", &mut mac).expect("32-byte HKDF output");
        hk.expand(b"opaque-id", &mut ids).expect("32-byte HKDF output");
        Crypto {
            cipher: Aes256Gcm::new(&enc.into()),
            code_mac: <Hmac<Sha256> as Mac>::new_from_slice(&mac).expect("HMAC takes any key length"),
            ids: Aes256::new(&ids.into()),
        }
    }

    /// `nonce || ciphertext || tag`, with a fresh random nonce each call.
    pub fn encrypt(&self, purpose: Purpose<'_>, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = purpose.aad();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of a bounded message cannot fail");
        let mut out = Vec::with_capacity(NONCE_BYTES + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn decrypt(&self, purpose: Purpose<'_>, sealed: &[u8]) -> Result<Vec<u8>, DecryptError> {
        if sealed.len() < NONCE_BYTES {
            return Err(DecryptError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_BYTES);
        let aad = purpose.aad();
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| DecryptError)
    }

    /// Keyed hash of a code: equal codes hash equal, and without the master key the hash
    /// tells nothing about the code.
    pub fn code_hash(&self, code: &[u8]) -> [u8; 32] {
        let mut mac = self.code_mac.clone();
        mac.update(code);
        mac.finalize().into_bytes().into()
    }

    /// A public identifier for an internal one (a row number): as stable and unique as
    /// the number, being a keyed permutation of it (one AES block), but telling nothing
    /// of it, such as how many rows came before.
    pub fn opaque_id(&self, internal: [u8; 16]) -> [u8; 16] {
        let mut block = internal.into();
        self.ids.encrypt_block(&mut block);
        block.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crypto() -> Crypto {
        Crypto::new(&[7u8; 32])
    }

    #[test]
    fn round_trips_with_fresh_nonces() {
        let c = crypto();
        let p = Purpose::Code { product_id: 1 };
        let a = c.encrypt(p, b"AAAA-BBBB");
        let b = c.encrypt(p, b"AAAA-BBBB");
        assert_ne!(a, b, "same code, different ciphertexts");
        assert_eq!(c.decrypt(p, &a).unwrap(), b"AAAA-BBBB");
        assert!(
            !a.windows(9).any(|w| w == b"AAAA-BBBB"),
            "plaintext visible in ciphertext"
        );
    }

    #[test]
    fn a_ciphertext_does_not_open_for_another_purpose_or_key_or_after_tampering() {
        let c = crypto();
        let sealed = c.encrypt(Purpose::Code { product_id: 1 }, b"X");
        assert!(c.decrypt(Purpose::Code { product_id: 2 }, &sealed).is_err());
        assert!(Crypto::new(&[8u8; 32])
            .decrypt(Purpose::Code { product_id: 1 }, &sealed)
            .is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(c.decrypt(Purpose::Code { product_id: 1 }, &bad).is_err());
        assert!(c.decrypt(Purpose::Code { product_id: 1 }, &sealed[..5]).is_err());
    }

    #[test]
    fn code_hash_is_keyed_and_deterministic() {
        let c = crypto();
        assert_eq!(c.code_hash(b"A"), c.code_hash(b"A"));
        assert_ne!(c.code_hash(b"A"), c.code_hash(b"B"));
        assert_ne!(c.code_hash(b"A"), Crypto::new(&[8u8; 32]).code_hash(b"A"));
    }

    #[test]
    fn opaque_ids_are_keyed_deterministic_and_hide_their_number() {
        let c = crypto();
        let one = |n: u8| {
            let mut b = [0u8; 16];
            b[15] = n;
            b
        };
        assert_eq!(c.opaque_id(one(1)), c.opaque_id(one(1)));
        assert_ne!(c.opaque_id(one(1)), c.opaque_id(one(2)));
        assert_ne!(c.opaque_id(one(1)), Crypto::new(&[8u8; 32]).opaque_id(one(1)));
        assert_ne!(c.opaque_id(one(1)), one(1));
        // Neighbouring numbers share no visible structure: about half their bits differ.
        let differ: u32 = c
            .opaque_id(one(1))
            .iter()
            .zip(c.opaque_id(one(2)))
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert!((32..=96).contains(&differ), "{differ} of 128 bits differ");
    }
}
