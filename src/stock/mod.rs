//! Sellable stock: codes imported into Postgres and mirrored into Redis as ciphertext.
//!
//! A Redis stock element is the code's Postgres id (8 bytes, big-endian) followed by its
//! AES-GCM ciphertext, so the reservation script can hand the ledger writer the row ids
//! without Redis ever holding a code in clear.

pub mod counts;
pub mod import;
pub mod lines;
pub mod mover;
pub mod sold_out;
pub mod void;

pub fn element(code_id: i64, code_enc: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(8 + code_enc.len());
    e.extend_from_slice(&code_id.to_be_bytes());
    e.extend_from_slice(code_enc);
    e
}

/// The code id and ciphertext of a stock element, or `None` if it is malformed.
pub fn parse_element(e: &[u8]) -> Option<(i64, &[u8])> {
    if e.len() <= 8 {
        return None;
    }
    let (id, enc) = e.split_at(8);
    Some((i64::from_be_bytes(id.try_into().ok()?), enc))
}

/// The code ids of well-formed elements (malformed ones are skipped).
pub fn code_ids(elements: &[Vec<u8>]) -> impl Iterator<Item = i64> + '_ {
    elements.iter().filter_map(|e| parse_element(e).map(|(id, _)| id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_round_trip() {
        let e = element(42, b"sealed");
        assert_eq!(parse_element(&e), Some((42, &b"sealed"[..])));
        assert_eq!(parse_element(b"short"), None);
    }
}
