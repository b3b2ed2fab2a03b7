//! Set-up shared by the SQLite store's tests.

use postbox_sqlite::SqliteStore;

/// A migrated outbox in a file database of its own (the directory goes when
/// the returned guard is dropped).
pub(crate) async fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let store = SqliteStore::connect(&url).await.expect("connect");
    postbox_sqlite::migrate(store.pool())
        .await
        .expect("migrate");
    (dir, store)
}
