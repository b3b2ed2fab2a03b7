//! SQL identifiers taken from configuration (table and schema names).
//!
//! They are validated once, here, so that stores can quote and splice them
//! into SQL text: only `[A-Za-z_][A-Za-z0-9_]*` up to 63 bytes is accepted,
//! which no quoting style can be broken out of.

use std::fmt;

/// A validated SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ident(String);

/// An identifier that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid SQL identifier {value:?}: use 1 to 63 letters, digits or underscores, not starting with a digit"
)]
pub struct IdentError {
    /// The refused text.
    pub value: String,
}

impl Ident {
    /// Validates `s`.
    ///
    /// ```
    /// use postbox_core::Ident;
    /// assert!(Ident::new("postbox_outbox").is_ok());
    /// assert!(Ident::new("outbox\"; DROP TABLE x; --").is_err());
    /// assert!(Ident::new("9lives").is_err());
    /// ```
    pub fn new(s: &str) -> Result<Self, IdentError> {
        let mut chars = s.chars();
        let ok_first = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok_first && ok_rest && s.len() <= 63 {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdentError {
                value: s.to_owned(),
            })
        }
    }

    /// The identifier as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Double-quoted, for PostgreSQL and SQLite.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// Back-quoted, for MySQL.
    pub fn backquoted(&self) -> String {
        format!("`{}`", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn accepted_identifiers_contain_no_quote_or_space(s in "\\PC{0,80}") {
            if let Ok(id) = Ident::new(&s) {
                prop_assert!(!id.as_str().contains(['"', '`', '\'', ' ', ';', '-', '.', '\0']));
                prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= 63);
            }
        }
    }

    #[test]
    fn refuses_injection_attempts() {
        for bad in [
            "",
            "a b",
            "a\"b",
            "a`b",
            "a;b",
            "a.b",
            "x--",
            "é",
            &"a".repeat(64),
        ] {
            assert!(Ident::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
