//! Mapping sqlx errors to [`StoreError`] without leaking secrets.

use postbox_core::StoreError;

/// SQLite result codes meaning "try again": BUSY, LOCKED and their extended
/// forms (the low byte is the primary code).
fn is_busy(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

pub(crate) fn db_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Box::new(e)),
        sqlx::Error::Database(d) if d.code().as_deref().is_some_and(is_busy) => {
            StoreError::Unavailable(Box::new(e))
        }
        sqlx::Error::Database(d) if d.message().contains("no such table") => {
            StoreError::Schema(d.message().to_owned())
        }
        _ => StoreError::Database(Box::new(e)),
    }
}
