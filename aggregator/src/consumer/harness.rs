//! The consumer loop driven end to end by fakes: a bus whose partitions and assignment a test
//! scripts (logs shared between members, cut markers appended to them), and a store that
//! behaves as the ClickHouse block insert does: it keeps every row it is sent (no key: a row
//! sent twice is stored twice, and the tests see it), checks the partition's floor inside the
//! insert, drops a copy of a block it holds, sets apart the rows a test names, and loses answers
//! (after storing) when asked. They pin what any version of the loop must do: resume at the
//! stored floor, set refused rows apart, refuse a floor from another topic, read a partition
//! taken away and given back from its floor, store each row once through failures, and leave
//! nothing doubled when a writer paused before its insert wakes up after another wrote on.

use super::*;
use backends::error::ErrorKind;
use backends::sink::WriteOutcome;
use backends::source::Polled;
use backends::store::StoredOffsets;
use schemas::event::{BusEvent, RatedEvent};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;

/// What the fake store holds.
#[derive(Default)]
struct StoreState {
    /// Each stored key with the position it was read from.
    rows: HashMap<String, BusPosition>,
    /// How many times each key was inserted (a key inserted twice is a duplicate row).
    inserts: HashMap<String, usize>,
    /// Per partition, the offset after the greatest block end of its rows.
    floors: HashMap<i32, i64>,
    /// Per partition, the greatest block end recorded for blocks that stored no row.
    recorded: HashMap<i32, i64>,
    /// The blocks inserted, as (partition, first, last, keys): a copy is dropped.
    blocks: HashSet<(i32, i64, i64, Vec<String>)>,
    /// Keys the store refuses for good (bad data).
    refused: HashSet<String>,
    /// Inserts still to answer with a failure after storing (an answer lost on the way).
    lost_answers: usize,
    /// Block inserts the floor check skipped.
    late: usize,
}

impl StoreState {
    /// Stores `key` as the row of `position` in a block ending at `last`.
    fn insert(&mut self, key: &str, position: BusPosition, last: i64) {
        self.rows.insert(key.to_string(), position);
        *self.inserts.entry(key.to_string()).or_default() += 1;
        let floor = self.floors.entry(position.partition).or_insert(0);
        *floor = (*floor).max(last + 1);
    }

    /// Where the next block of `partition` starts, as the store sees it.
    fn next(&self, partition: i32) -> i64 {
        let rows = self.floors.get(&partition).copied().unwrap_or(0);
        let recorded = self.recorded.get(&partition).map_or(0, |l| l + 1);
        rows.max(recorded)
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

/// A writer of the fake store; `gate`, when set, holds its first block insert after the key
/// lookup (a writer paused between deciding its rows and its INSERT reaching the server).
struct Store {
    state: Arc<Mutex<StoreState>>,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Store {
    fn new(state: &Arc<Mutex<StoreState>>) -> Store {
        Store {
            state: state.clone(),
            gate: None,
        }
    }
}

fn failed(kind: ErrorKind, detail: &str) -> StoreError {
    StoreError::Failed {
        store: "fake",
        context: "insert",
        kind,
        detail: detail.into(),
    }
}

#[async_trait::async_trait]
impl BlockWriter for Store {
    async fn write_block(&mut self, block: &Block) -> Result<BlockWrite, StoreError> {
        // The key lookup, as the real writer makes it: stored keys and repeats are dropped;
        // and the rows the store refuses are set apart before the insert.
        let mut rows: Vec<(String, BusPosition)> = Vec::new();
        let mut write = BlockWrite::default();
        {
            let state = self.state.lock().unwrap();
            let mut seen: HashSet<&str> = HashSet::new();
            for b in &block.batches {
                let mut outcome = WriteOutcome::with_positions();
                for (i, (e, p)) in b.events.iter().zip(&b.positions).enumerate() {
                    let key = e.idempotency_key.as_str();
                    if state.rows.contains_key(key) || !seen.insert(key) {
                        outcome.repeated_at(i);
                    } else if state.refused.contains(key) {
                        let reason = failed(ErrorKind::Permanent, "a row the store refuses");
                        write.refused.push((*p, reason));
                    } else {
                        outcome.stored();
                        rows.push((key.to_string(), *p));
                    }
                }
                write.outcomes.push(outcome);
            }
        }
        if rows.is_empty() {
            return Ok(write);
        }
        if let Some(gate) = self.gate.take() {
            let _ = gate.await;
        }
        // The server's side of the INSERT.
        let mut state = self.state.lock().unwrap();
        let keys: Vec<String> = rows.iter().map(|(k, _)| k.clone()).collect();
        if state.next(block.partition) > block.first {
            // The floor check, in the INSERT's SELECT.
            state.late += 1;
        } else if !state
            .blocks
            .insert((block.partition, block.first, block.last, keys))
        {
            // The same rows inserted before: the table drops the copy.
        } else {
            for (key, position) in &rows {
                state.insert(key, *position, block.last);
            }
        }
        if state.lost_answers > 0 {
            state.lost_answers -= 1;
            return Err(failed(ErrorKind::Retriable, "timed out (stored)"));
        }
        Ok(write)
    }
}

#[async_trait::async_trait]
impl StoredOffsets for Store {
    async fn stored_offsets(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(partitions
            .iter()
            .filter(|p| state.next(**p) > 0)
            .map(|p| (*p, state.next(*p) - 1))
            .collect())
    }

    async fn record_offsets(&self, offsets: &[(i32, i64)]) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        for (p, o) in offsets {
            let recorded = state.recorded.entry(*p).or_insert(*o);
            *recorded = (*recorded).max(*o);
        }
        Ok(())
    }
}

/// A record of a fake partition.
#[derive(Clone)]
enum Entry {
    Event(String),
    Poison,
    Cut,
}

/// The partitions' logs, shared by every member reading them.
type Logs = Arc<Mutex<BTreeMap<i32, Vec<Entry>>>>;

/// A scripted change of the group or the store, before a poll.
enum Change {
    /// The partition is taken away (this poll says so) and given back; the bus reads it again
    /// from `from` (the group's committed offset, a hint).
    Reassign { partition: i32, from: i64 },
    /// Runs on the store (another member writing meanwhile).
    Store(Box<dyn FnOnce(&mut StoreState) + Send + Sync>),
    /// Events appended to a partition (the ingestor publishing).
    Append { partition: i32, keys: Vec<String> },
}

/// One member's view of the bus: a read position per partition, and a script of changes, one
/// taken per poll.
struct Bus {
    logs: Logs,
    read: Mutex<BTreeMap<i32, i64>>,
    script: VecDeque<Change>,
    store: Arc<Mutex<StoreState>>,
    seeks: Mutex<Vec<BusPosition>>,
    dead_letters: Mutex<Vec<BusPosition>>,
    empty_polls: usize,
    shutdown: watch::Sender<bool>,
}

/// Logs of `n` events each (keys `p{partition}-{offset}`), with poison at `poison`.
fn logs(partitions: &[(i32, usize)], poison: &[BusPosition]) -> Logs {
    let logs = partitions
        .iter()
        .map(|&(p, n)| {
            let log = (0..n as i64)
                .map(|o| {
                    let poisoned = poison.contains(&BusPosition {
                        partition: p,
                        offset: o,
                    });
                    match poisoned {
                        true => Entry::Poison,
                        false => Entry::Event(format!("p{p}-{o}")),
                    }
                })
                .collect();
            (p, log)
        })
        .collect();
    Arc::new(Mutex::new(logs))
}

impl Bus {
    /// A member reading every partition of `logs` from offset 0.
    fn new(logs: &Logs, store: &Arc<Mutex<StoreState>>) -> (Bus, watch::Receiver<bool>) {
        let (shutdown, receiver) = watch::channel(false);
        let read = logs.lock().unwrap().keys().map(|p| (*p, 0)).collect();
        let bus = Bus {
            logs: logs.clone(),
            read: Mutex::new(read),
            script: VecDeque::new(),
            store: store.clone(),
            seeks: Mutex::new(Vec::new()),
            dead_letters: Mutex::new(Vec::new()),
            empty_polls: 0,
            shutdown,
        };
        (bus, receiver)
    }
}

fn message(partition: i32, offset: i64, entry: &Entry) -> BusMessage {
    let content = match entry {
        Entry::Event(key) => Content::Event(BusEvent {
            tenant_id: "t".into(),
            event: RatedEvent::sample_call(key, 1_795_132_800_000),
        }),
        Entry::Poison => Content::Poison(Poison {
            reason: "not JSON".into(),
            key: None,
            payload: Some(b"{".to_vec()),
        }),
        Entry::Cut => Content::Cut,
    };
    BusMessage {
        position: BusPosition { partition, offset },
        content,
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
            Some(Change::Append { partition, keys }) => {
                let mut logs = self.logs.lock().unwrap();
                let log = logs.get_mut(&partition).expect("a partition of the test");
                log.extend(keys.into_iter().map(Entry::Event));
            }
            None => {}
        }
        let logs = self.logs.lock().unwrap();
        let mut read = self.read.lock().unwrap();
        for (p, log) in logs.iter() {
            let next = read.get_mut(p).expect("every partition is read");
            while polled.messages.len() < max && *next < log.len() as i64 {
                polled
                    .messages
                    .push(message(*p, *next, &log[*next as usize]));
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

    async fn cut(&self, partitions: &[i32]) -> Result<(), BusError> {
        let mut logs = self.logs.lock().unwrap();
        for partition in partitions {
            logs.get_mut(partition).expect("held").push(Entry::Cut);
        }
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
        Ok(self.logs.lock().unwrap()[&partition].len() as i64)
    }

    fn topic(&self) -> &str {
        "events"
    }

    fn commit(&self, _next: &[BusPosition]) {}

    fn assignment(&self) -> Vec<i32> {
        self.logs.lock().unwrap().keys().copied().collect()
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Runs the loop over `bus` into `store` until the bus has nothing more.
fn drive(
    bus: &mut Bus,
    shutdown: watch::Receiver<bool>,
    store: &Arc<Mutex<StoreState>>,
    max_batch_rows: usize,
) -> Result<Progress, ConsumerError> {
    let mut writer = Store::new(store);
    let status = ConsumerStatus::default();
    runtime().block_on(run(
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
    // A block 0..=4 is stored; the bus starts at 2, the group's committed hint.
    let store = Arc::new(Mutex::new(StoreState::default()));
    let logs = logs(&[(0, 10)], &[]);
    let (mut bus, shutdown) = Bus::new(&logs, &store);
    {
        let mut s = store.lock().unwrap();
        for o in 0..5 {
            let position = BusPosition {
                partition: 0,
                offset: o,
            };
            s.insert(&format!("p0-{o}"), position, 4);
        }
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
    // The marker the loop appended (offset 10) closed the block 5..=10.
    assert_eq!(store.lock().unwrap().next(0), 11);
}

#[test]
fn a_refused_row_and_poison_are_set_apart_and_the_rest_is_stored_once() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let poison = BusPosition {
        partition: 1,
        offset: 2,
    };
    let logs = logs(&[(0, 8), (1, 5)], &[poison]);
    let (mut bus, shutdown) = Bus::new(&logs, &store);
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
    // Each partition's block ends at its marker (8 and 5), the refused row set apart.
    let s = store.lock().unwrap();
    assert_eq!((s.next(0), s.next(1)), (9, 6));
}

#[test]
fn a_floor_past_the_end_of_the_partition_is_another_topics_and_refused() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let logs = logs(&[(0, 10)], &[]);
    let (mut bus, shutdown) = Bus::new(&logs, &store);
    store.lock().unwrap().recorded.insert(0, 50);
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
    // The loop stores a first block, loses the partition, and meanwhile another member stores
    // more; the bus gives the partition back at the group's hint, 4.
    let store = Arc::new(Mutex::new(StoreState::default()));
    let logs = logs(&[(0, 4)], &[]);
    let (mut bus, shutdown) = Bus::new(&logs, &store);
    let more = |from: i64| keys(0, from..from + 3);
    bus.script.push_back(Change::Store(Box::new(|_| {})));
    bus.script.push_back(Change::Store(Box::new(|_| {})));
    bus.script.push_back(Change::Append {
        partition: 0,
        keys: more(100),
    });
    bus.script.push_back(Change::Reassign {
        partition: 0,
        from: 4,
    });
    // The other member's block: offsets 5..=7 (after the marker at 4), ending at 8.
    bus.script.push_back(Change::Store(Box::new(|s| {
        for (o, key) in (5..8).zip(keys(0, 100..103)) {
            let position = BusPosition {
                partition: 0,
                offset: o,
            };
            s.insert(&key, position, 8);
        }
    })));
    let progress = drive(&mut bus, shutdown, &store, 100).unwrap();
    let mut expected = keys(0, 0..4);
    expected.extend(more(100));
    expected.sort();
    assert_eq!(stored_keys(&store), expected);
    assert_stored_once(&store);
    assert_eq!(progress.rows_written, 4);
    assert!(
        bus.seeks.lock().unwrap().contains(&BusPosition {
            partition: 0,
            offset: 9
        }),
        "{:?}",
        bus.seeks.lock().unwrap()
    );
}

#[test]
fn inserts_whose_answers_were_lost_are_retried_and_store_each_row_once() {
    let store = Arc::new(Mutex::new(StoreState::default()));
    let logs = logs(&[(0, 10), (1, 10)], &[]);
    let (mut bus, shutdown) = Bus::new(&logs, &store);
    store.lock().unwrap().lost_answers = 3;
    let progress = drive(&mut bus, shutdown, &store, 6).unwrap();
    let mut expected = keys(0, 0..10);
    expected.extend(keys(1, 0..10));
    expected.sort();
    assert_eq!(stored_keys(&store), expected);
    assert_stored_once(&store);
    assert!(progress.duplicates > 0, "{progress:?}");
}

/// Writer A decides its block's rows and is paused before its insert; B takes the partition
/// and stores that block (and, in the second run, the next); A wakes up and sends its insert.
/// The store refuses it: A's block starts below B's floor.
#[test]
fn a_writer_paused_before_its_insert_wakes_up_to_a_refusal() {
    for more in [false, true] {
        let store = Arc::new(Mutex::new(StoreState::default()));
        let logs = logs(&[(0, 10)], &[]);
        let (mut a, a_shutdown) = Bus::new(&logs, &store);
        let (mut b, b_shutdown) = Bus::new(&logs, &store);
        b.script.push_back(Change::Store(Box::new(|_| {})));
        b.script.push_back(Change::Store(Box::new(|_| {})));
        if more {
            b.script.push_back(Change::Append {
                partition: 0,
                keys: keys(0, 100..105),
            });
        }
        let (wake, gate) = tokio::sync::oneshot::channel();
        let mut writer_a = Store {
            state: store.clone(),
            gate: Some(gate),
        };
        let mut writer_b = Store::new(&store);
        let (status_a, status_b) = (ConsumerStatus::default(), ConsumerStatus::default());
        let config = config(100);
        let (progress_a, _) = runtime().block_on(async {
            tokio::join!(
                run(&mut a, &mut writer_a, &config, &status_a, a_shutdown),
                async {
                    let progress = run(&mut b, &mut writer_b, &config, &status_b, b_shutdown).await;
                    let _ = wake.send(());
                    progress
                }
            )
        });
        progress_a.unwrap();
        let mut expected = keys(0, 0..10);
        if more {
            expected.extend(keys(0, 100..105));
        }
        expected.sort();
        assert_eq!(stored_keys(&store), expected, "B stored more: {more}");
        assert_stored_once(&store);
        assert!(
            store.lock().unwrap().late >= 1,
            "A's insert reached the store late"
        );
    }
}
