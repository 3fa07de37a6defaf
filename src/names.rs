//! When two names are "the same" to a reader: nicks in a room and registered user names are
//! compared by a key, not by their bytes, so that `ANN`, `аnn` (Cyrillic а) and `ann.` cannot
//! stand beside `ann`.
//!
//! The key of a name is: lower-cased, mapped to its confusable skeleton (Unicode Technical
//! Standard #39, which also decomposes it, NFD), lower-cased again, with `.`, `_`, `-` and
//! spaces removed. Two names with the same key clash. This is stricter than PRECIS
//! (RFC 8265/8266, which compare case-folded NFC strings): PRECIS alone would still let a
//! Cyrillic lookalike through.

use unicode_security::confusable_detection::skeleton;

/// The comparison key of `name` (see the module docs).
pub fn comparison_key(name: &str) -> String {
    let lower = name.to_lowercase();
    skeleton(&lower)
        .flat_map(char::to_lowercase)
        .filter(|c| !matches!(c, '.' | '_' | '-' | ' '))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::comparison_key;

    #[test]
    fn lookalikes_share_a_key() {
        let ann = comparison_key("ann");
        for lookalike in ["ANN", "Ann", "\u{430}nn", "ann.", "a_nn", "a-n-n", "a nn"] {
            assert_eq!(comparison_key(lookalike), ann, "{lookalike:?}");
        }
        for other in ["anne", "bob", "an"] {
            assert_ne!(comparison_key(other), ann, "{other:?}");
        }
        // Digits and letters that look alike (0/o, 1/l) are confusables too.
        assert_eq!(comparison_key("b0b"), comparison_key("bob"));
    }
}
