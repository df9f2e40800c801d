//! The consumer loop driven end to end by fakes: a bus whose partitions, assignment and
//! membership a test scripts, and a store that keeps every row it is sent (no key: a row sent
//! twice is stored twice), refuses the rows a test names, and fails inserts (after storing part
//! of them) when asked. They pin what any
//! version of the loop must do: resume at the stored floor, set refused rows apart, refuse a
//! floor from another topic, forget a revoked partition, write nothing once the group went on
//! without it, and store each row once through failures.

use super::*;
use backends::sink::WriteOutcome;
use backends::source::Polled;
use schemas::event::{BusEvent, RatedEvent};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What the fake store holds.
#[derive(Default)]
struct StoreState {
    /// Each stored key with the position it was read from.
    rows: HashMap<String, BusPosition>,
    /// How many times each key was inserted (a key inserted twice is a duplicate row).
    inserts: HashMap<String, usize>,
    floors: HashMap<i32, i64>,
    /// Keys the store refuses for good (bad data).
    refused: HashSet<String>,
    /// Writes still to fail after storing the first half of their new rows.
    partial_failures: usize,
}

impl StoreState {
    fn insert(&mut self, key: &str, position: BusPosition) {
        self.rows.insert(key.to_string(), position);
        *self.inserts.entry(key.to_string()).or_default() += 1;
    }

    /// Keys inserted more than once.
    fn doubled(&self) -> Vec<&String> {
        self.inserts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k)
            .collect()
    }
}

struct Store(Arc<Mutex<StoreState>>);

fn failed(kind: ErrorKind, detail: &str) -> StoreError {
    StoreError::Failed {
        store: "fake",
        context: "insert",
        kind,
        detail: detail.into(),
    }
}

#[async_trait::async_trait]
impl StoreWriter for Store {
    async fn write(&mut self, batches: &[TenantBatch]) -> Result<Vec<WriteOutcome>, StoreError> {
        // Like a table with no key: every row sent is stored, so a row the loop sends twice is
        // stored twice, and the tests see it.
        let mut state = self.0.lock().unwrap();
        let rows: Vec<(&str, BusPosition)> = batches
            .iter()
            .flat_map(|b| {
                b.events
                    .iter()
                    .map(|e| e.idempotency_key.as_str())
                    .zip(b.positions.iter().copied())
            })
            .collect();
        if rows.iter().any(|(k, _)| state.refused.contains(*k)) {
            return Err(failed(ErrorKind::Permanent, "a row the store refuses"));
        }
        if state.partial_failures > 0 {
            state.partial_failures -= 1;
            for (key, position) in &rows[..rows.len() / 2] {
                state.insert(key, *position);
            }
            return Err(failed(ErrorKind::Retriable, "timed out after storing part"));
        }
        for (key, position) in &rows {
            state.insert(key, *position);
        }
        Ok(batches
            .iter()
            .map(|b| WriteOutcome {
                accepted: b.events.len(),
                ..WriteOutcome::default()
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl StoredOffsets for Store {
    async fn stored_offsets(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, StoreError> {
        let state = self.0.lock().unwrap();
        Ok(partitions
            .iter()
            .filter_map(|p| state.floors.get(p).map(|f| (*p, *f)))
            .collect())
    }

    async fn record_offsets(&self, offsets: &[(i32, i64)]) -> Result<(), StoreError> {
        let mut state = self.0.lock().unwrap();
        for (p, o) in offsets {
            let floor = state.floors.entry(*p).or_insert(*o);
            *floor = (*floor).max(*o);
        }
        Ok(())
    }

    async fn stored_positions(
        &self,
        batches: &[TenantBatch],
    ) -> Result<HashSet<BusPosition>, StoreError> {
        let state = self.0.lock().unwrap();
        let stored: HashSet<BusPosition> = state.rows.values().copied().collect();
        Ok(batches
            .iter()
            .flat_map(|b| b.positions.iter().copied())
            .filter(|p| stored.contains(p))
            .collect())
    }
}

/// A scripted change of the group or the store, before a poll.
enum Change {
    /// The partition is taken away (this poll says so) and given back; the bus reads it again
    /// from `from` (the group's committed offset, a hint).
    Reassign { partition: i32, from: i64 },
    /// Runs on the store (another member writing meanwhile).
    Store(Box<dyn FnOnce(&mut StoreState) + Send + Sync>),
    /// The group goes on without this member, which has not heard yet.
    Expelled,
}

/// The fake bus: one log per partition (an event each offset, or poison), a read position
/// each, and a script of changes, one taken per poll.
struct Bus {
    logs: BTreeMap<i32, Vec<Option<String>>>,
    read: Mutex<BTreeMap<i32, i64>>,
    script: VecDeque<Change>,
    member: AtomicBool,
    store: Arc<Mutex<StoreState>>,
    seeks: Mutex<Vec<BusPosition>>,
    dead_letters: Mutex<Vec<BusPosition>>,
    empty_polls: usize,
    shutdown: watch::Sender<bool>,
}

impl Bus {
    /// Partitions of `n` events each (keys `p{partition}-{offset}`), read from offset 0, with
    /// poison at `poison`.
    fn new(
        partitions: &[(i32, usize)],
        poison: &[BusPosition],
        store: &Arc<Mutex<StoreState>>,
    ) -> (Bus, watch::Receiver<bool>) {
        let (shutdown, receiver) = watch::channel(false);
        let logs = partitions
            .iter()
            .map(|&(p, n)| {
                let log = (0..n as i64)
                    .map(|o| {
                        let poisoned = poison.contains(&BusPosition {
                            partition: p,
                            offset: o,
                        });
                        (!poisoned).then(|| format!("p{p}-{o}"))
                    })
                    .collect();
                (p, log)
            })
            .collect();
        let bus = Bus {
            logs,
            read: Mutex::new(partitions.iter().map(|&(p, _)| (p, 0)).collect()),
            script: VecDeque::new(),
            member: AtomicBool::new(true),
            store: store.clone(),
            seeks: Mutex::new(Vec::new()),
            dead_letters: Mutex::new(Vec::new()),
            empty_polls: 0,
            shutdown,
        };
        (bus, receiver)
    }

    fn message(&self, partition: i32, offset: i64) -> BusMessage {
        let content = match &self.logs[&partition][offset as usize] {
            Some(key) => Ok(BusEvent {
                tenant_id: "t".into(),
                event: RatedEvent::sample_call(key, 1_795_132_800_000),
            }),
            None => Err(Poison {
                reason: "not JSON".into(),
                key: None,
                payload: Some(b"{".to_vec()),
            }),
        };
        BusMessage {
            position: BusPosition { partition, offset },
            content,
        }
    }
}

#[async_trait::async_trait]
impl EventSource for Bus {
    async fn poll(
        &mut self,
        max: usize,
        _idle: Duration,
        _fill: Duration,
    ) -> Result<Polled, BusError> {
        let mut polled = Polled::default();
        match self.script.pop_front() {
            Some(Change::Reassign { partition, from }) => {
                polled.revoked.push(partition);
                self.read.lock().unwrap().insert(partition, from);
                return Ok(polled);
            }
            Some(Change::Store(change)) => change(&mut self.store.lock().unwrap()),
            Some(Change::Expelled) => self.member.store(false, Ordering::SeqCst),
            None => {}
        }
        let mut read = self.read.lock().unwrap();
        for (p, log) in &self.logs {
            let next = read.get_mut(p).expect("every partition is read");
            while polled.messages.len() < max && *next < log.len() as i64 {
                polled.messages.push(self.message(*p, *next));
                *next += 1;
            }
        }
        if polled.messages.is_empty() && self.script.is_empty() {
            self.empty_polls += 1;
            if self.empty_polls >= 2 {
                let _ = self.shutdown.send(true);
            }
        }
        Ok(polled)
    }

    async fn dead_letter(&self, position: BusPosition, _poison: &Poison) -> Result<(), BusError> {
        self.dead_letters.lock().unwrap().push(position);
        Ok(())
    }

    async fn seek(&self, position: BusPosition) -> Result<(), BusError> {
        self.seeks.lock().unwrap().push(position);
        self.read
            .lock()
            .unwrap()
            .insert(position.partition, position.offset);
        Ok(())
    }

    async fn end_offset(&self, partition: i32) -> Result<i64, BusError> {
        Ok(self.logs[&partition].len() as i64)
    }

    fn topic(&self) -> &str {
        "events"
    }

    fn commit(&self, _next: &[BusPosition]) {}

    fn still_member(&self) -> bool {
        self.member.load(Ordering::SeqCst)
    }

    fn assignment(&self) -> Vec<i32> {
        self.logs.keys().copied().collect()
    }

    async fn rejoin(&mut self) -> Result<Vec<i32>, BusError> {
        Ok(self.assignment())
    }
}

fn config(max_batch_rows: usize) -> ConsumerConfig {
    ConsumerConfig {
        max_batch_rows,
        max_batch_wait: Duration::from_millis(1),
        max_retry_backoff: Duration::from_millis(1),
        give_up_after: Duration::from_secs(5),
    }
}

/// Runs the loop over `bus` into `store` until the bus has nothing more.
fn drive(
    bus: &mut Bus,
    shutdown: watch::Receiver<bool>,
    store: &Arc<Mutex<StoreState>>,
    max_batch_rows: usize,
) -> Result<Progress, ConsumerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut writer = Store(store.clone());
    let status = ConsumerStatus::default();
    runtime.block_on(run(
        bus,
        &mut writer,
        &config(max_batch_rows),
        &status,
        shutdown,
    ))
}

/// Fails, naming them, when keys were inserted more than once.
fn assert_stored_once(store: &Arc<Mutex<StoreState>>) {
    let state = store.lock().unwrap();
    let doubled = state.doubled();
    assert!(doubled.is_empty(), "stored twice: {doubled:?}");
}

fn stored_keys(store: &Arc<Mutex<StoreState>>) -> Vec<String> {
    let mut keys: Vec<String> = store.lock().unwrap().rows.keys().cloned().collect();
    keys.sort();
    keys
}

fn keys(partition: i32, offsets: std::ops::Range<i64>) -> Vec<String> {
    offsets.map(|o| format!("p{partition}-{o}")).collect()
}

#[test]
fn it_resumes_at_the_stored_floor_whatever_offset_the_bus_starts_at() {
    // Offsets 0 to 4 are stored (floor 4); the bus starts at 2, the group's committed hint.
    let store = Arc::new(Mutex::new(StoreState::default()));
    let (mut bus, shutdown) = Bus::new(&[(0, 10)], &[], &store);
    {
        let mut s = store.lock().unwrap();
        for o in 0..5 {
            s.insert(
                &format!("p0-{o}"),
                BusPosition {
                    partition: 0,
                    offset: o,
                },
            );
        }
        s.floors.insert(0, 4);
    }
    bus.read.lock().unwrap().insert(0, 2);
    let progress = drive(&mut bus, shutdown, &store, 100).unwrap();
    assert_eq!(
        *bus.seeks.lock().unwrap(),
        [BusPosition {
            partition: 0,
            offset: 5
        }]
    );
    assert_eq!(stored_keys(&store), keys(0, 0..10));
    assert_eq!(progress.rows_written, 5);
    assert_stored_once(&store);
    assert_eq!(store.lock().unwrap().floors[&0], 9);
}

#[test]
fn a_refused_row_and_poison_are_set_apart_and_the_rest_is_stored_once() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let poison = BusPosition {
        partition: 1,
        offset: 2,
    };
    let (mut bus, shutdown) = Bus::new(&[(0, 8), (1, 5)], &[poison], &store);
    store.lock().unwrap().refused.insert("p0-3".into());
    let progress = drive(&mut bus, shutdown, &store, 100).unwrap();
    let mut expected: Vec<String> = keys(0, 0..8)
        .into_iter()
        .filter(|k| k != "p0-3")
        .chain(keys(1, 0..5).into_iter().filter(|k| k != "p1-2"))
        .collect();
    expected.sort();
    assert_eq!(stored_keys(&store), expected);
    let mut dead = bus.dead_letters.lock().unwrap().clone();
    dead.sort_by_key(|p| (p.partition, p.offset));
    assert_eq!(
        dead,
        [
            BusPosition {
                partition: 0,
                offset: 3
            },
            poison
        ]
    );
    assert_eq!(progress.dead_letters, 2);
    assert_stored_once(&store);
    let floors = store.lock().unwrap().floors.clone();
    assert_eq!((floors[&0], floors[&1]), (7, 4));
}

#[test]
fn a_floor_past_the_end_of_the_partition_is_another_topics_and_refused() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let (mut bus, shutdown) = Bus::new(&[(0, 10)], &[], &store);
    store.lock().unwrap().floors.insert(0, 50);
    match drive(&mut bus, shutdown, &store, 100) {
        Err(ConsumerError::ForeignOffsets {
            partition,
            floor,
            end,
            ..
        }) => {
            assert_eq!((partition, floor, end), (0, 50, 10))
        }
        other => panic!("{other:?}"),
    }
    assert!(stored_keys(&store).is_empty());
}

#[test]
fn a_partition_taken_away_and_given_back_is_read_again_from_its_floor() {
    // The loop stores a first batch of 4, loses the partition, and meanwhile another member
    // stores offsets 4 to 6; the bus gives the partition back at the group's hint, 4.
    let store = Arc::new(Mutex::new(StoreState::default()));
    let (mut bus, shutdown) = Bus::new(&[(0, 10)], &[], &store);
    bus.script.push_back(Change::Store(Box::new(|_| {})));
    bus.script.push_back(Change::Reassign {
        partition: 0,
        from: 4,
    });
    bus.script.push_back(Change::Store(Box::new(|s| {
        for o in 4..7 {
            s.insert(
                &format!("p0-{o}"),
                BusPosition {
                    partition: 0,
                    offset: o,
                },
            );
        }
        s.floors.insert(0, 6);
    })));
    let progress = drive(&mut bus, shutdown, &store, 4).unwrap();
    assert_eq!(stored_keys(&store), keys(0, 0..10));
    assert_stored_once(&store);
    assert_eq!(progress.rows_written, 4 + 3);
    assert!(bus.seeks.lock().unwrap().contains(&BusPosition {
        partition: 0,
        offset: 7
    }));
}

#[test]
fn a_member_the_group_went_on_without_writes_nothing_more() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let (mut bus, shutdown) = Bus::new(&[(0, 10)], &[], &store);
    bus.script.push_back(Change::Expelled);
    let progress = drive(&mut bus, shutdown, &store, 100).unwrap();
    assert!(stored_keys(&store).is_empty());
    assert_eq!(progress.rows_written, 0);
}

#[test]
fn inserts_that_failed_after_storing_part_are_retried_and_store_each_row_once() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let (mut bus, shutdown) = Bus::new(&[(0, 10), (1, 10)], &[], &store);
    store.lock().unwrap().partial_failures = 3;
    let progress = drive(&mut bus, shutdown, &store, 6).unwrap();
    let mut expected = keys(0, 0..10);
    expected.extend(keys(1, 0..10));
    expected.sort();
    assert_eq!(stored_keys(&store), expected);
    assert_stored_once(&store);
    assert!(progress.already_stored > 0, "{progress:?}");
}
