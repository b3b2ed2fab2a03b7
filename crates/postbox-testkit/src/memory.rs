//! An in-memory [`Store`], the reference implementation of the store state
//! machine. Single process only; for tests and examples.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Disposition, Filter, GroupBy, GroupStats,
    Headers, Lease, ListQuery, Message, MessageRecord, NewMessage, PurgeQuery, RelayHeartbeat,
    RelayRecord, SharedClock, Stats, Status, Store, StoreError, SystemClock, since,
};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Row {
    id: Uuid,
    topic: String,
    key: Option<String>,
    payload: Bytes,
    headers: Headers,
    tenant: Option<String>,
    max_attempts: Option<u32>,
    created_at: SystemTime,
    available_at: SystemTime,
    dead: bool,
    parked: bool,
    attempts: u32,
    lease: Option<(Uuid, SystemTime)>,
    last_error: Option<String>,
    /// Set when the row was sent and is kept (a store with a retention).
    sent_at: Option<SystemTime>,
}

impl Row {
    fn leased(&self, now: SystemTime) -> bool {
        self.lease.is_some_and(|(_, until)| until > now)
    }

    fn matches(&self, f: &Filter, now: SystemTime) -> bool {
        f.topic.as_ref().is_none_or(|t| *t == self.topic)
            && f.key.as_ref().is_none_or(|k| Some(k) == self.key.as_ref())
            && f.tenant
                .as_ref()
                .is_none_or(|t| Some(t) == self.tenant.as_ref())
            && (f.ids.is_empty() || f.ids.contains(&self.id))
            && f.older_than
                .is_none_or(|age| since(now, self.created_at) >= age)
            && f.error_contains.as_ref().is_none_or(|text| {
                self.last_error
                    .as_ref()
                    .is_some_and(|e| e.contains(text.as_str()))
            })
    }

    fn status(&self, now: SystemTime) -> Status {
        if self.sent_at.is_some() {
            Status::Sent
        } else if self.dead {
            Status::Dead
        } else if self.leased(now) {
            Status::Leased
        } else {
            Status::Pending
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next_seq: i64,
    rows: BTreeMap<i64, Row>,
    offset: Duration,
    /// Heartbeats by relay id, with when each was written (store clock).
    relays: HashMap<Uuid, (RelayHeartbeat, SystemTime)>,
}

/// Counts one group's rows into stats, as `stats` does for all of them.
fn count<'a>(rows: impl Iterator<Item = &'a Row>, now: SystemTime) -> Stats {
    let (mut ready, mut delayed, mut retrying, mut leased, mut dead, mut sent) = (0, 0, 0, 0, 0, 0);
    let mut parked = HashSet::new();
    let mut oldest: Option<SystemTime> = None;
    for row in rows {
        if row.sent_at.is_some() {
            sent += 1;
            continue;
        }
        if row.dead {
            dead += 1;
            if row.parked {
                parked.insert(row.key.clone());
            }
            continue;
        }
        oldest = Some(oldest.map_or(row.created_at, |o| o.min(row.created_at)));
        if row.leased(now) {
            leased += 1;
        } else if row.attempts > 0 {
            retrying += 1;
        } else if row.available_at > now {
            delayed += 1;
        } else {
            ready += 1;
        }
    }
    Stats::new(
        ready,
        delayed,
        retrying,
        leased,
        dead,
        parked.len() as u64,
        sent,
        oldest,
    )
}

/// An in-memory outbox store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use postbox_testkit::MemoryStore;
/// use postbox_core::NewMessage;
///
/// let store = MemoryStore::new();
/// let mut tx = store.begin();
/// tx.enqueue(NewMessage::new("orders.created", "{}"));
/// tx.commit(); // dropping `tx` instead would roll back
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    clock: SharedClock,
    /// Keep sent rows this long instead of deleting them.
    retain_sent: Option<Duration>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store whose "database clock" is `clock`.
    pub fn with_clock(clock: SharedClock) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                next_seq: 1,
                ..State::default()
            })),
            clock,
            retain_sent: None,
        }
    }

    /// This store (same rows) keeping sent messages for `keep` instead of
    /// deleting them (`None`: delete on success, the default); see
    /// `Disposition::Sent`.
    #[must_use]
    pub fn retain_sent(mut self, keep: Option<Duration>) -> Self {
        self.retain_sent = keep;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread must not hide this test's result.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self, st: &State) -> SystemTime {
        self.clock.now() + st.offset
    }

    /// Moves this store's clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.lock().offset += by;
    }

    /// Starts a transaction; its messages become visible on `commit`.
    pub fn begin(&self) -> MemoryTx {
        MemoryTx {
            store: self.clone(),
            pending: Vec::new(),
        }
    }

    /// Enqueues messages in one committed transaction.
    pub fn enqueue(&self, msgs: impl IntoIterator<Item = NewMessage>) {
        let mut tx = self.begin();
        for m in msgs {
            tx.enqueue(m);
        }
        tx.commit();
    }
}

/// A transaction on a [`MemoryStore`]; dropped without `commit`, it rolls back.
#[derive(Debug)]
pub struct MemoryTx {
    store: MemoryStore,
    pending: Vec<NewMessage>,
}

impl MemoryTx {
    /// Adds a message to the transaction.
    pub fn enqueue(&mut self, msg: NewMessage) {
        self.pending.push(msg);
    }

    /// Makes the transaction's messages visible, in enqueue order.
    pub fn commit(self) {
        let mut st = self.store.lock();
        let now = self.store.now(&st);
        for m in self.pending {
            let seq = st.next_seq;
            st.next_seq += 1;
            st.rows.insert(
                seq,
                Row {
                    id: m.id,
                    topic: m.topic,
                    key: m.key,
                    payload: m.payload,
                    headers: m.headers,
                    tenant: m.tenant,
                    max_attempts: m.max_attempts,
                    created_at: now,
                    available_at: m.available_at.unwrap_or(now),
                    dead: false,
                    parked: false,
                    attempts: 0,
                    lease: None,
                    last_error: None,
                    sent_at: None,
                },
            );
        }
    }
}

impl Store for MemoryStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        let lease = Lease {
            token: Uuid::new_v4(),
            expires_at: now + req.lease,
        };
        let mut seen_keys: HashSet<String> = HashSet::new();
        let mut messages = Vec::new();
        for (&seq, row) in st.rows.iter_mut() {
            if messages.len() >= req.limit {
                break;
            }
            // sent rows and unparked dead ones never hold their key back
            if row.sent_at.is_some() || (row.dead && !row.parked) {
                continue;
            }
            if let Some(k) = &row.key {
                // Only the first unsent row of a key (the head) may go.
                if !seen_keys.insert(k.clone()) {
                    continue;
                }
            }
            if row.dead
                || row.leased(now)
                || row.available_at > now
                || req
                    .tenant
                    .as_ref()
                    .is_some_and(|t| Some(t) != row.tenant.as_ref())
            {
                continue;
            }
            row.attempts += 1;
            row.lease = Some((lease.token, lease.expires_at));
            messages.push(Message::new(
                row.id,
                seq,
                row.topic.clone(),
                row.key.clone(),
                row.payload.clone(),
                row.headers.clone(),
                row.tenant.clone(),
                row.attempts,
                row.max_attempts,
                row.created_at,
            ));
        }
        Ok(Claim::new(lease, messages, Vec::new()))
    }

    async fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        let mut report = CompleteReport::default();
        for c in completions {
            let Some(row) = st.rows.get_mut(&c.seq) else {
                report.lost += 1;
                continue;
            };
            if row.dead || row.sent_at.is_some() || row.lease.map(|(t, _)| t) != Some(token) {
                report.lost += 1;
                continue;
            }
            report.applied += 1;
            row.lease = None;
            match &c.disposition {
                Disposition::Sent if self.retain_sent.is_some() => {
                    row.sent_at = Some(now);
                }
                Disposition::Sent => {
                    st.rows.remove(&c.seq);
                }
                Disposition::Retry { delay, error } => {
                    row.available_at = now + *delay;
                    row.last_error = Some(error.clone());
                }
                Disposition::Dead { error, park } => {
                    row.dead = true;
                    row.parked = *park && row.key.is_some();
                    row.last_error = Some(error.clone());
                }
                Disposition::Release => {
                    row.attempts = row.attempts.saturating_sub(1);
                }
                _ => {
                    return Err(StoreError::Config(format!(
                        "unsupported disposition {:?}",
                        c.disposition
                    )));
                }
            }
        }
        Ok(report)
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        let st = self.lock();
        let now = self.now(&st);
        Ok(count(
            st.rows.values().filter(|r| r.matches(filter, now)),
            now,
        ))
    }

    async fn pending_tenants(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let st = self.lock();
        let tenants: std::collections::BTreeSet<&String> = st
            .rows
            .values()
            .filter(|r| !r.dead && r.sent_at.is_none())
            .filter_map(|r| r.tenant.as_ref())
            .collect();
        Ok(tenants.into_iter().take(limit).cloned().collect())
    }

    async fn stats_by(&self, filter: &Filter, by: GroupBy) -> Result<Vec<GroupStats>, StoreError> {
        let st = self.lock();
        let now = self.now(&st);
        let mut groups: BTreeMap<Option<String>, Vec<&Row>> = BTreeMap::new();
        for row in st.rows.values().filter(|r| r.matches(filter, now)) {
            let group = match by {
                GroupBy::Tenant => row.tenant.clone(),
                _ => Some(row.topic.clone()),
            };
            groups.entry(group).or_default().push(row);
        }
        Ok(groups
            .into_iter()
            .map(|(group, rows)| GroupStats::new(group, count(rows.into_iter(), now)))
            .collect())
    }

    async fn heartbeat(&self, heartbeat: &RelayHeartbeat) -> Result<(), StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        st.relays
            .insert(heartbeat.relay_id, (heartbeat.clone(), now));
        Ok(())
    }

    async fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        let st = self.lock();
        let now = self.now(&st);
        let mut out: Vec<RelayRecord> = st
            .relays
            .values()
            .map(|(h, at)| RelayRecord::new(h.clone(), *at, since(now, *at)))
            .collect();
        out.sort_by_key(|r| (r.heartbeat.started_at, r.heartbeat.relay_id));
        Ok(out)
    }

    async fn remove_relay(&self, relay_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.lock().relays.remove(&relay_id).is_some())
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        let st = self.lock();
        let now = self.now(&st);
        Ok(st
            .rows
            .iter()
            .filter(|(seq, _)| q.after_seq.is_none_or(|a| **seq > a))
            .filter(|(_, r)| r.matches(&q.filter, now))
            .filter(|(_, r)| q.status.is_none_or(|s| r.status(now) == s))
            .take(q.limit)
            .map(|(&seq, r)| {
                MessageRecord::new(
                    seq,
                    r.id,
                    r.topic.clone(),
                    r.key.clone(),
                    r.tenant.clone(),
                    r.status(now),
                    r.attempts,
                    r.max_attempts,
                    r.last_error.clone(),
                    r.parked,
                    r.created_at,
                    r.available_at,
                    r.headers.clone(),
                    r.payload.clone(),
                )
                .sent_at(r.sent_at)
            })
            .collect())
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        // a replayed keyed message waits for the live leases on its key
        // (a later message may be leased: one lease per key at a time)
        let mut leased_until: HashMap<String, SystemTime> = HashMap::new();
        for row in st.rows.values().filter(|r| !r.dead && r.sent_at.is_none()) {
            if let (Some(key), Some((_, until))) = (&row.key, row.lease)
                && until > now
            {
                let end = leased_until.entry(key.clone()).or_insert(until);
                *end = (*end).max(until);
            }
        }
        let mut n = 0;
        for row in st.rows.values_mut() {
            if row.dead && row.matches(filter, now) {
                row.dead = false;
                row.parked = false;
                row.attempts = 0;
                row.available_at = row
                    .key
                    .as_ref()
                    .and_then(|k| leased_until.get(k))
                    .map_or(now, |until| (*until).max(now));
                n += 1;
            }
        }
        Ok(n)
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        let mut n = 0;
        for row in st.rows.values_mut() {
            if row.dead && row.parked && row.matches(filter, now) {
                row.parked = false;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn purge(&self, q: &PurgeQuery) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        if !matches!(q.status, Status::Dead | Status::Sent) {
            return Ok(0);
        }
        let before = st.rows.len();
        st.rows
            .retain(|_, r| !(r.status(now) == q.status && r.matches(&q.filter, now)));
        Ok((before - st.rows.len()) as u64)
    }

    fn sent_retention(&self) -> Option<Duration> {
        self.retain_sent
    }

    async fn purge_sent(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let now = self.now(&st);
        // oldest sent first, as the SQL stores delete them
        let mut expired: Vec<(SystemTime, i64)> = st
            .rows
            .iter()
            .filter_map(|(&seq, r)| r.sent_at.map(|at| (at, seq)))
            .filter(|&(at, _)| since(now, at) >= older_than)
            .collect();
        expired.sort_unstable();
        expired.truncate(limit);
        for (_, seq) in &expired {
            st.rows.remove(seq);
        }
        Ok(expired.len() as u64)
    }
}
