//! PostgreSQL's `tid` (a row version's physical address, `ctid`), which
//! sqlx does not map: a held batch remembers where each of its rows is, so
//! that its completion deletes them by address (a TID scan) instead of
//! looking each one up in the primary key.
//!
//! The address of a row version cannot change while the transaction that
//! locked it (`FOR UPDATE`) is open and has not updated it: nobody else can
//! update or delete it, `VACUUM` does not move live rows, and `VACUUM FULL`
//! or `CLUSTER` wait for the table lock the transaction holds. The store uses these addresses only
//! within that transaction and only before it writes those rows.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef, Postgres,
};
use sqlx::{Decode, Encode, Type};

/// `tid`'s built-in type OIDs (`pg_type.h`): fixed, so no lookup.
const TID_OID: u32 = 27;
const TID_ARRAY_OID: u32 = 1010;

/// A row version's address: heap block and line pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tid {
    block: u32,
    offset: u16,
}

impl Type<Postgres> for Tid {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(TID_OID))
    }
}

impl PgHasArrayType for Tid {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(TID_ARRAY_OID))
    }
}

impl Encode<'_, Postgres> for Tid {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // `tidsend`: the block as a 4-byte, the offset as a 2-byte integer,
        // both big-endian
        buf.extend_from_slice(&self.block.to_be_bytes());
        buf.extend_from_slice(&self.offset.to_be_bytes());
        Ok(IsNull::No)
    }
}

impl Decode<'_, Postgres> for Tid {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let bytes = value.as_bytes()?;
                let (block, offset) = match bytes {
                    [b0, b1, b2, b3, o0, o1] => (
                        u32::from_be_bytes([*b0, *b1, *b2, *b3]),
                        u16::from_be_bytes([*o0, *o1]),
                    ),
                    _ => return Err(format!("a tid is 6 bytes, got {}", bytes.len()).into()),
                };
                Ok(Self { block, offset })
            }
            PgValueFormat::Text => parse(value.as_str()?),
        }
    }
}

/// `tidout`'s form, `(block,offset)`.
fn parse(text: &str) -> Result<Tid, BoxDynError> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("not a tid: {text:?}"))?;
    let (block, offset) = inner
        .split_once(',')
        .ok_or_else(|| format!("not a tid: {text:?}"))?;
    Ok(Tid {
        block: block.trim().parse()?,
        offset: offset.trim().parse()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_form() {
        assert_eq!(
            parse("(4294967295,65535)").expect("parse"),
            Tid {
                block: u32::MAX,
                offset: u16::MAX
            }
        );
        assert_eq!(
            parse("(0,1)").expect("parse"),
            Tid {
                block: 0,
                offset: 1
            }
        );
        assert!(parse("0,1").is_err());
        assert!(parse("(0;1)").is_err());
        assert!(parse("(0,70000)").is_err());
    }
}
