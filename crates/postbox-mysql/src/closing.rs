//! [`Closing`]: a pooled connection that is closed, not given back to its
//! pool, unless the work done on it finished.

use sqlx::pool::PoolConnection;
use sqlx::{MySql, MySqlConnection, MySqlPool};

/// A pooled connection closed, not returned to the pool, when it is dropped
/// before [`Closing::done`]: the future using it was dropped (the relay gave
/// up a claim that got no answer, a caller gave up `migrate`) or it returned
/// an error.
///
/// Returned, sqlx would first ping it, and a connection gone silent answers
/// no ping for as long as the kernel keeps the socket, many minutes, holding
/// a pool slot all that time; closing gives the slot back within seconds
/// (sqlx bounds a close at 5 s). A session left mid-statement, or holding
/// session state such as a `GET_LOCK`, must not serve anyone else either:
/// closing ends it on the server, which rolls back what it had open.
pub(crate) struct Closing {
    conn: PoolConnection<MySql>,
    done: bool,
}

impl Closing {
    /// Takes a connection from `pool`.
    pub(crate) async fn acquire(pool: &MySqlPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            conn: pool.acquire().await?,
            done: false,
        })
    }

    /// Finished normally: the connection goes back to the pool.
    pub(crate) fn done(mut self) {
        self.done = true;
    }
}

impl std::ops::Deref for Closing {
    type Target = MySqlConnection;

    fn deref(&self) -> &MySqlConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Closing {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        &mut self.conn
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}
