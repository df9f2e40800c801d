//! Lag that tells the truth, and what to do when nobody consumes it.
//!
//! Every `lag_check_interval_ms`, whether or not anything is inserted, the monitor reads each
//! partition's end offset from the broker ([`TopicProbe`]) and its stored floor from the store
//! ([`StoredOffsets`]): lag = end − (floor + 1), the records acknowledged to clients and not yet
//! stored. A partition is *stalled* when it has lag and its floor has not moved for
//! `stall_timeout_ms` of successful checks: no member of the group is storing it.
//!
//! Consumer groups can leave partitions with nobody (tansu 0.6.0 does, after a member dies,
//! with an empty SyncGroup assignment). When this aggregator has no partitions, or owns a
//! stalled one while it is not busy writing, it is part of the problem and can fix it: it asks
//! the loop to leave and rejoin the group (between two batches, so one writer per partition and
//! the stored-floor rule still hold). If the stall outlives another `stall_timeout_ms`, it asks
//! the loop to exit non-zero, for a supervisor to restart it. A stalled partition that this
//! aggregator does not own (nobody may own it: a group can hand out only some partitions) is
//! reported (health, metrics, a warning), and past twice the timeout it rejoins once, since a
//! rebalance is harmless; it never exits over a partition that is not its own.
//!
//! A check that cannot read the broker or the store restarts the stall clocks: while ClickHouse
//! or the broker is down, no member can store anything, and rejoining would not help. Checks
//! that keep failing for `stall_timeout_ms` make the report `unreachable`: `/healthz` answers 503
//! then, as it does for a stall, and `/readyz` answers 503 from the first failed check.

use backends::metrics::{head, single};
use backends::source::TopicProbe;
use backends::store::StoredOffsets;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often to measure and how long a stall may last.
#[derive(Clone, Debug)]
pub struct LagConfig {
    pub interval: Duration,
    pub stall_timeout: Duration,
    /// Where the stored floors are read, as errors name it (`ClickHouse at http://…`).
    pub store: String,
}

/// What the consumer loop and the monitor tell each other. The loop publishes its assignment
/// and whether it is writing; the monitor asks for a rejoin or an exit, and the loop acts on
/// it between two batches.
#[derive(Default)]
pub struct ConsumerStatus {
    assigned: Mutex<Vec<i32>>,
    writing: AtomicBool,
    rejoin: AtomicBool,
    give_up: Mutex<Option<String>>,
    rejoins: AtomicU64,
}

impl ConsumerStatus {
    pub fn set_assigned(&self, mut partitions: Vec<i32>) {
        partitions.sort_unstable();
        *self.assigned.lock().expect("status lock") = partitions;
    }
    pub fn assigned(&self) -> Vec<i32> {
        self.assigned.lock().expect("status lock").clone()
    }
    pub fn set_writing(&self, writing: bool) {
        self.writing.store(writing, Ordering::Relaxed);
    }
    pub fn is_writing(&self) -> bool {
        self.writing.load(Ordering::Relaxed)
    }
    /// Whether the monitor asked for a rejoin since the last call (and clears the request).
    pub fn take_rejoin(&self) -> bool {
        let asked = self.rejoin.swap(false, Ordering::AcqRel);
        if asked {
            self.rejoins.fetch_add(1, Ordering::Relaxed);
        }
        asked
    }
    /// Why the monitor asked the loop to exit, if it did.
    pub fn give_up(&self) -> Option<String> {
        self.give_up.lock().expect("status lock").clone()
    }
    pub fn rejoins(&self) -> u64 {
        self.rejoins.load(Ordering::Relaxed)
    }
}

/// One partition in the health answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub partition: i32,
    /// The offset the next record will get.
    pub end_offset: i64,
    /// The greatest offset below which everything is stored (−1: nothing yet).
    pub stored_floor: i64,
    /// Records acknowledged and not stored: `endOffset − storedFloor − 1`.
    pub lag_records: i64,
    /// Whether this aggregator owns the partition now.
    pub assigned_here: bool,
    /// How long it has had lag with its floor unmoved (0 when it has none).
    pub stalled_seconds: f64,
    /// Past the stall timeout: nobody stores it.
    pub stalled: bool,
}

/// What the last check found; the aggregator's `/healthz` answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LagReport {
    /// `ok`; `stalled` when some partition has had unstored records past the stall timeout with
    /// nobody storing them (the health check answers 503); `unknown` when the last check could
    /// not read the broker or the store (see `error`), or none ran yet; `unreachable` when checks
    /// have failed for the whole stall timeout (503: nothing can be stored).
    pub status: &'static str,
    /// The partitions this aggregator owns.
    pub assigned: Vec<i32>,
    pub lag_records: i64,
    /// Age of the oldest record acknowledged and not stored, when there is one.
    pub oldest_unstored_age_seconds: Option<f64>,
    pub stall_timeout_seconds: f64,
    /// Times this aggregator left and rejoined the group because of a stall.
    pub rejoins: u64,
    /// When the last successful check ran (RFC 3339).
    pub measured_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub partitions: Vec<PartitionLag>,
}

impl LagReport {
    fn new(config: &LagConfig) -> LagReport {
        LagReport {
            status: "unknown",
            assigned: Vec::new(),
            lag_records: 0,
            oldest_unstored_age_seconds: None,
            stall_timeout_seconds: config.stall_timeout.as_secs_f64(),
            rejoins: 0,
            measured_at: None,
            error: Some("no check has run yet".into()),
            partitions: Vec::new(),
        }
    }

    /// What `/healthz` answers: false while records wait with nobody storing them, or while the
    /// broker or the store has been out of reach for the stall timeout.
    pub fn is_healthy(&self) -> bool {
        !matches!(self.status, "stalled" | "unreachable")
    }

    /// What `/readyz` answers: the last check read both the broker and the store.
    pub fn is_ready(&self) -> bool {
        matches!(self.status, "ok" | "stalled")
    }

    /// The aggregator's own metric families, in Prometheus text format.
    pub fn render_metrics(&self, checks_failed: u64, out: &mut String) {
        head(
            out,
            "mcp_meter_aggregator_partition_lag_records",
            "gauge",
            "Per partition: records acknowledged to clients and not yet stored (end offset minus stored floor), measured on a timer",
        );
        for p in &self.partitions {
            let _ = writeln!(
                out,
                "mcp_meter_aggregator_partition_lag_records{{partition=\"{}\"}} {}",
                p.partition, p.lag_records
            );
        }
        let gauges = [
            (
                "mcp_meter_aggregator_lag_records",
                "Records acknowledged to clients and not yet stored, over all partitions",
                self.lag_records as f64,
            ),
            (
                "mcp_meter_aggregator_oldest_unstored_age_seconds",
                "Age of the oldest record acknowledged and not yet stored (0 when none)",
                self.oldest_unstored_age_seconds.unwrap_or(0.0),
            ),
            (
                "mcp_meter_aggregator_stalled_partitions",
                "Partitions with unstored records whose floor has not moved for the stall timeout",
                self.partitions.iter().filter(|p| p.stalled).count() as f64,
            ),
            (
                "mcp_meter_aggregator_assigned_partitions",
                "Partitions of the events topic this aggregator owns",
                self.assigned.len() as f64,
            ),
        ];
        for (name, help, value) in gauges {
            single(out, name, "gauge", help, value);
        }
        let counters = [
            (
                "mcp_meter_aggregator_rejoins_total",
                "Times this aggregator left and rejoined the consumer group because of a stall",
                self.rejoins,
            ),
            (
                "mcp_meter_aggregator_lag_checks_failed_total",
                "Lag checks that could not read the broker or the store",
                checks_failed,
            ),
        ];
        for (name, help, value) in counters {
            single(out, name, "counter", help, value);
        }
    }
}

/// Per partition, since when its floor has stood still with lag. Pure: time comes in.
#[derive(Debug, Default)]
pub struct Stalls {
    /// Partition → (floor, first seen with lag at that floor).
    since: HashMap<i32, (i64, Instant)>,
}

impl Stalls {
    /// Takes one successful check's (partition, floor, lag) and answers, per partition, how
    /// long it has stood still with lag (zero when it has none or just moved).
    pub fn observe(&mut self, now: Instant, partitions: &[(i32, i64, i64)]) -> Vec<Duration> {
        partitions
            .iter()
            .map(|&(p, floor, lag)| {
                if lag <= 0 {
                    self.since.remove(&p);
                    return Duration::ZERO;
                }
                let entry = self.since.entry(p).or_insert((floor, now));
                if entry.0 != floor {
                    *entry = (floor, now);
                }
                now - entry.1
            })
            .collect()
    }

    /// Forgets every clock: a check failed, so nobody could have stored anything meanwhile.
    pub fn reset(&mut self) {
        self.since.clear();
    }
}

/// What the monitor asks of the loop after a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Rejoin,
    GiveUp,
}

/// The escalation rule. `stalled`: partitions past the stall timeout, `longest`: the longest
/// stall. This aggregator is part of the problem when it is not busy writing and it either owns
/// none of the partitions or owns a stalled one: then it rejoins the group, and if the stall
/// outlives another timeout after that, it gives up. A stalled partition it does not own may
/// have nobody (a group can hand out only some partitions) or a live owner that is stuck: past
/// twice the timeout it rejoins once, since a rebalance is harmless, but it never gives up over
/// a partition that is not its own. `rejoined_at` is the monitor's memory of its last rejoin,
/// cleared once no partition is stalled.
pub fn decide(
    now: Instant,
    stalled: &[i32],
    longest: Duration,
    assigned: &[i32],
    writing: bool,
    rejoined_at: &mut Option<Instant>,
    stall_timeout: Duration,
) -> Action {
    if stalled.is_empty() {
        *rejoined_at = None;
        return Action::Nothing;
    }
    if writing {
        return Action::Nothing;
    }
    let implicated = assigned.is_empty() || stalled.iter().any(|p| assigned.contains(p));
    match *rejoined_at {
        None if implicated || longest >= stall_timeout * 2 => {
            *rejoined_at = Some(now);
            Action::Rejoin
        }
        Some(at) if implicated && now - at >= stall_timeout => Action::GiveUp,
        _ => Action::Nothing,
    }
}

/// Measures lag on a timer, publishes the report, and escalates stalls.
pub struct LagMonitor<P, O> {
    probe: Arc<P>,
    offsets: O,
    status: Arc<ConsumerStatus>,
    report: Arc<RwLock<LagReport>>,
    checks_failed: Arc<AtomicU64>,
    config: LagConfig,
}

/// What the HTTP side reads: the last report and the failed-check count.
#[derive(Clone)]
pub struct LagView {
    report: Arc<RwLock<LagReport>>,
    checks_failed: Arc<AtomicU64>,
}

impl LagView {
    pub fn report(&self) -> LagReport {
        self.report.read().expect("report lock").clone()
    }
    pub fn render_metrics(&self, out: &mut String) {
        self.report()
            .render_metrics(self.checks_failed.load(Ordering::Relaxed), out);
    }
}

impl<P: TopicProbe, O: StoredOffsets> LagMonitor<P, O> {
    pub fn new(
        probe: P,
        offsets: O,
        status: Arc<ConsumerStatus>,
        config: LagConfig,
    ) -> (LagMonitor<P, O>, LagView) {
        let report = Arc::new(RwLock::new(LagReport::new(&config)));
        let checks_failed = Arc::new(AtomicU64::new(0));
        let view = LagView {
            report: report.clone(),
            checks_failed: checks_failed.clone(),
        };
        let monitor = LagMonitor {
            probe: Arc::new(probe),
            offsets,
            status,
            report,
            checks_failed,
            config,
        };
        (monitor, view)
    }

    /// Checks every interval until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut stalls = Stalls::default();
        let mut rejoined_at = None;
        // Per partition: the floor whose next record's time is known, and that time.
        let mut written: HashMap<i32, (i64, i64)> = HashMap::new();
        let mut failing_since: Option<Instant> = None;
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            match self.measure(&mut written).await {
                Ok(measured) => {
                    failing_since = None;
                    self.judge(measured, &mut stalls, &mut rejoined_at);
                }
                Err(error) => {
                    stalls.reset();
                    self.failed(error, *failing_since.get_or_insert_with(Instant::now));
                }
            }
        }
    }

    /// A check that could not read the broker or the store, in a run of failures since `since`.
    fn failed(&self, error: String, since: Instant) {
        self.checks_failed.fetch_add(1, Ordering::Relaxed);
        let unreachable = since.elapsed() >= self.config.stall_timeout;
        let mut report = self.report.write().expect("report lock");
        if unreachable && report.status != "unreachable" {
            tracing::warn!(%error, seconds = since.elapsed().as_secs(),
                "lag checks keep failing: nothing can be stored; /healthz answers 503");
        }
        report.status = if unreachable {
            "unreachable"
        } else {
            "unknown"
        };
        report.error = Some(error);
        report.assigned = self.status.assigned();
        report.rejoins = self.status.rejoins();
    }

    /// Per partition (partition, end, floor), and the oldest unstored record's write time.
    async fn measure(
        &self,
        written: &mut HashMap<i32, (i64, i64)>,
    ) -> Result<(Vec<(i32, i64, i64)>, Option<i64>), String> {
        let probe = self.probe.clone();
        let ends = tokio::task::spawn_blocking(move || probe.end_offsets())
            .await
            .map_err(|e| format!("lag probe: {e}"))?
            .map_err(|e| e.to_string())?;
        let partitions: Vec<i32> = ends.iter().map(|(p, _)| *p).collect();
        let floors = self
            .offsets
            .stored_offsets(&partitions)
            .await
            .map_err(|e| format!("{}: {e}", self.config.store))?;
        let mut measured = Vec::with_capacity(ends.len());
        let mut oldest: Option<i64> = None;
        for (p, end) in ends {
            let floor = floors.get(&p).copied().unwrap_or(-1);
            measured.push((p, end, floor));
            if end <= floor + 1 {
                written.remove(&p);
                continue;
            }
            let known = written
                .get(&p)
                .filter(|(f, _)| *f == floor)
                .map(|(_, t)| *t);
            let at = match known {
                Some(at) => Some(at),
                None => {
                    let probe = self.probe.clone();
                    // A record the broker cannot show now leaves the age unknown this round; the
                    // next round asks again.
                    let at = tokio::task::spawn_blocking(move || probe.written_at_ms(p, floor + 1))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten();
                    if let Some(at) = at {
                        written.insert(p, (floor, at));
                    }
                    at
                }
            };
            if let Some(at) = at {
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        Ok((measured, oldest))
    }

    fn judge(
        &self,
        (measured, oldest): (Vec<(i32, i64, i64)>, Option<i64>),
        stalls: &mut Stalls,
        rejoined_at: &mut Option<Instant>,
    ) {
        let now = Instant::now();
        let assigned = self.status.assigned();
        let lags: Vec<(i32, i64, i64)> = measured
            .iter()
            .map(|&(p, end, floor)| (p, floor, (end - floor - 1).max(0)))
            .collect();
        let still = stalls.observe(now, &lags);
        let partitions: Vec<PartitionLag> = measured
            .iter()
            .zip(&lags)
            .zip(&still)
            .map(|((&(p, end, floor), &(_, _, lag)), stood)| PartitionLag {
                partition: p,
                end_offset: end,
                stored_floor: floor,
                lag_records: lag,
                assigned_here: assigned.contains(&p),
                stalled_seconds: stood.as_secs_f64(),
                stalled: *stood >= self.config.stall_timeout,
            })
            .collect();
        let stalled: Vec<i32> = partitions
            .iter()
            .filter(|p| p.stalled)
            .map(|p| p.partition)
            .collect();
        let lag_records: i64 = partitions.iter().map(|p| p.lag_records).sum();
        let writing = self.status.is_writing();
        let longest = still.iter().max().copied().unwrap_or_default();
        let action = decide(
            now,
            &stalled,
            longest,
            &assigned,
            writing,
            rejoined_at,
            self.config.stall_timeout,
        );
        let now_ms = chrono::Utc::now().timestamp_millis();
        {
            let mut report = self.report.write().expect("report lock");
            *report = LagReport {
                status: if stalled.is_empty() { "ok" } else { "stalled" },
                assigned: assigned.clone(),
                lag_records,
                oldest_unstored_age_seconds: oldest.map(|at| (now_ms - at).max(0) as f64 / 1000.0),
                stall_timeout_seconds: self.config.stall_timeout.as_secs_f64(),
                rejoins: self.status.rejoins(),
                measured_at: Some(chrono::Utc::now().to_rfc3339()),
                error: None,
                partitions,
            };
        }
        if stalled.is_empty() {
            return;
        }
        // At most one line per check: the interval rate-limits it.
        tracing::warn!(?stalled, lag_records, ?assigned, writing, action = ?action,
            "partitions have unstored records and nobody stores them");
        match action {
            Action::Nothing => {}
            Action::Rejoin => self.status.rejoin.store(true, Ordering::Release),
            Action::GiveUp => {
                *self.status.give_up.lock().expect("status lock") = Some(format!(
                    "partitions {stalled:?} kept {lag_records} unstored records for more than \
{} s after this aggregator rejoined the group (it owns {assigned:?})",
                    self.config.stall_timeout.as_secs()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn a_partition_stalls_only_while_its_floor_stands_still_with_lag() {
        let mut stalls = Stalls::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(stalls.observe(t0, &[(0, 5, 3), (1, 9, 0)]), [s(0), s(0)]);
        assert_eq!(
            stalls.observe(t0 + s(10), &[(0, 5, 4), (1, 9, 0)]),
            [s(10), s(0)]
        );
        // The floor moved: the clock starts again even though lag remains.
        assert_eq!(
            stalls.observe(t0 + s(20), &[(0, 7, 2), (1, 9, 2)]),
            [s(0), s(0)]
        );
        assert_eq!(
            stalls.observe(t0 + s(45), &[(0, 7, 2), (1, 9, 2)]),
            [s(25), s(25)]
        );
        // No lag: not stalled, whatever the floor.
        assert_eq!(
            stalls.observe(t0 + s(50), &[(0, 7, 0), (1, 9, 2)]),
            [s(0), s(30)]
        );
        stalls.reset();
        assert_eq!(
            stalls.observe(t0 + s(60), &[(0, 7, 1), (1, 9, 2)]),
            [s(0), s(0)]
        );
    }

    #[test]
    fn an_aggregator_without_partitions_rejoins_then_gives_up_when_a_stall_lasts() {
        let t0 = Instant::now();
        let mut rejoined = None;
        let act = |at, rejoined: &mut Option<Instant>| decide(at, &[2], T, &[], false, rejoined, T);
        assert_eq!(act(t0, &mut rejoined), Action::Rejoin);
        assert_eq!(rejoined, Some(t0));
        assert_eq!(
            act(t0 + Duration::from_secs(29), &mut rejoined),
            Action::Nothing
        );
        assert_eq!(act(t0 + T, &mut rejoined), Action::GiveUp);
    }

    #[test]
    fn a_stall_that_clears_after_a_rejoin_resets_the_escalation() {
        let t0 = Instant::now();
        let mut rejoined = None;
        assert_eq!(
            decide(t0, &[0], T, &[0], false, &mut rejoined, T),
            Action::Rejoin
        );
        assert_eq!(
            decide(t0 + T / 2, &[], T, &[0], false, &mut rejoined, T),
            Action::Nothing
        );
        assert_eq!(rejoined, None);
        assert_eq!(
            decide(t0 + T * 3, &[0], T, &[0], false, &mut rejoined, T),
            Action::Rejoin
        );
    }

    #[test]
    fn a_stall_of_another_members_partition_rejoins_once_late_and_never_gives_up() {
        let t0 = Instant::now();
        let mut rejoined = None;
        // Partition 3 is not ours: wait for its owner (or a rebalance) for twice the timeout.
        assert_eq!(
            decide(t0, &[3], T, &[0, 1], false, &mut rejoined, T),
            Action::Nothing
        );
        assert_eq!(
            decide(t0, &[3], T * 2, &[0, 1], false, &mut rejoined, T),
            Action::Rejoin
        );
        assert_eq!(
            decide(t0 + T * 5, &[3], T * 7, &[0, 1], false, &mut rejoined, T),
            Action::Nothing
        );
    }

    #[test]
    fn a_stall_while_this_aggregator_is_busy_writing_is_the_stores_not_the_groups() {
        let t0 = Instant::now();
        let mut rejoined = None;
        assert_eq!(
            decide(t0, &[0], T * 9, &[0], true, &mut rejoined, T),
            Action::Nothing
        );
        assert_eq!(rejoined, None);
    }

    /// A broker nobody can reach.
    struct Unreachable;
    impl TopicProbe for Unreachable {
        fn end_offsets(&self) -> Result<Vec<(i32, i64)>, backends::source::BusError> {
            Err(backends::kafka::unreachable(
                "10.9.9.9:9092",
                Duration::from_secs(3),
                "BrokerTransportFailure",
            ))
        }
        fn written_at_ms(&self, _: i32, _: i64) -> Result<Option<i64>, backends::source::BusError> {
            unreachable!("no end offsets, no records")
        }
    }
    struct NoFloors;
    #[async_trait::async_trait]
    impl StoredOffsets for NoFloors {
        async fn stored_offsets(
            &self,
            _: &[i32],
        ) -> Result<HashMap<i32, i64>, backends::error::StoreError> {
            Ok(HashMap::new())
        }
        async fn record_offsets(
            &self,
            _: &[(i32, i64)],
        ) -> Result<(), backends::error::StoreError> {
            Ok(())
        }
    }

    #[test]
    fn a_broker_out_of_reach_for_the_stall_timeout_makes_health_fail_and_names_the_address() {
        let config = LagConfig {
            interval: Duration::from_millis(20),
            stall_timeout: Duration::from_millis(300),
            store: "the store".into(),
        };
        let (monitor, view) = LagMonitor::new(
            Unreachable,
            NoFloors,
            Arc::new(ConsumerStatus::default()),
            config,
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (stop, shutdown) = watch::channel(false);
        let (early, late) = runtime.block_on(async move {
            let running = tokio::spawn(monitor.run(shutdown));
            tokio::time::sleep(Duration::from_millis(100)).await;
            let early = view.report();
            tokio::time::sleep(Duration::from_millis(400)).await;
            let late = view.report();
            stop.send(true).unwrap();
            running.await.unwrap();
            (early, late)
        });
        // Failing, not yet for long: not ready, still alive.
        assert_eq!(early.status, "unknown");
        assert!(!early.is_ready());
        assert!(early.is_healthy());
        // Failing for the stall timeout: health says so, and the error names what to fix.
        assert_eq!(late.status, "unreachable");
        assert!(!late.is_healthy());
        let error = late.error.unwrap();
        assert!(error.contains("10.9.9.9:9092"), "{error}");
        assert!(error.contains("kafka.brokers"), "{error}");
    }

    #[test]
    fn metrics_name_every_partition_and_the_totals() {
        let config = LagConfig {
            interval: Duration::from_secs(1),
            stall_timeout: T,
            store: "the store".into(),
        };
        let mut report = LagReport::new(&config);
        report.partitions = vec![PartitionLag {
            partition: 1,
            end_offset: 10,
            stored_floor: 4,
            lag_records: 5,
            assigned_here: false,
            stalled_seconds: 31.0,
            stalled: true,
        }];
        report.lag_records = 5;
        report.oldest_unstored_age_seconds = Some(2.5);
        let mut out = String::new();
        report.render_metrics(3, &mut out);
        for line in [
            "mcp_meter_aggregator_partition_lag_records{partition=\"1\"} 5\n",
            "mcp_meter_aggregator_lag_records 5\n",
            "mcp_meter_aggregator_oldest_unstored_age_seconds 2.5\n",
            "mcp_meter_aggregator_stalled_partitions 1\n",
            "mcp_meter_aggregator_lag_checks_failed_total 3\n",
        ] {
            assert!(out.contains(line), "{line} in {out}");
        }
    }
}
