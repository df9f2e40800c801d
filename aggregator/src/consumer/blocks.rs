//! Cutting a partition's records into blocks, by rules that read only the log, so that every
//! writer of the partition (a retry, the next holder, a writer paused for an hour) cuts the
//! same blocks from the same first offset. A block is stored in one INSERT, and the store
//! drops a block it already holds: cut alike, a block sent twice is the same block.
//!
//! A block starts where the last one ended (offset 0 when nothing is stored) and ends at the
//! first of:
//! - a cut marker: an aggregator appends one when it has read to a partition's end and a block
//!   is still open, so a quiet partition waits no longer than one round trip to the broker;
//! - [`BLOCK_SPAN`] offsets: a block never spans more, so a busy partition that no one reads
//!   to its end still cuts;
//! - the record before the first event of another calendar month (by `occurredAt`, UTC): the
//!   events table is partitioned by month, and an insert into one partition is one part, which
//!   the store stores or drops whole.
//!
//! Offsets with no record (compaction, deleted records) count toward the span like any other.

use backends::sink::BusPosition;
use backends::source::{BusMessage, Content};

/// The most offsets one block spans. A constant of the protocol, not a setting: writers that
/// cut with different spans would write different blocks of the same records. It also bounds
/// what the aggregator holds while it drains a backlog (no marker is asked then): one open
/// block per partition held. With 32,768 and 6 partitions the aggregator grew to 226-243 MiB
/// draining 360,000 events; 4,096 keeps a block per partition to a few MiB.
pub const BLOCK_SPAN: i64 = 4_096;

/// A block's records: offsets `first..=last` of `partition`, the events and poison among them
/// in offset order (markers are left out).
#[derive(Debug)]
pub struct CutBlock {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    pub messages: Vec<BusMessage>,
}

/// The open block of one partition.
#[derive(Debug)]
pub struct Cutter {
    partition: i32,
    /// The open block's first offset.
    first: i64,
    /// The offset after the last message taken.
    next: i64,
    messages: Vec<BusMessage>,
    /// The calendar month (UTC, `yyyymm`) of the open block's events.
    month: Option<i32>,
    /// Whether a cut marker was asked for since the open block began.
    marker_asked: bool,
}

/// The `yyyymm` of an instant in ms (UTC), as the events table partitions it.
pub fn month_of(ms: i64) -> i32 {
    let day = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    use chrono::Datelike;
    day.year() * 100 + day.month() as i32
}

impl Cutter {
    /// A cutter whose next block starts at `first` (one past the last handled block).
    pub fn new(partition: i32, first: i64) -> Cutter {
        Cutter {
            partition,
            first,
            next: first,
            messages: Vec::new(),
            month: None,
            marker_asked: false,
        }
    }

    /// Where the open block starts: everything before it is cut.
    pub fn first(&self) -> i64 {
        self.first
    }

    /// Whether a block is open with records in it, and no marker was asked for it yet: then
    /// the caller asks for one once it has read to the partition's end.
    pub fn wants_marker(&self) -> bool {
        !self.messages.is_empty() && !self.marker_asked
    }

    /// Notes that a marker was asked for the open block.
    pub fn marker_asked(&mut self) {
        self.marker_asked = true;
    }

    /// Takes the partition's next message and answers the blocks it closes, in order. A
    /// message at or below one taken before (the bus reading again from an older position) is
    /// left out: a block holds each record once, in offset order. A block with no event and no poison is answered only when a marker
    /// closes it (two writers each asked for one): its end is then recorded, so that the
    /// partition's floor reaches the marker. Empty spans are skipped silently; the next
    /// block's end covers them.
    pub fn push(&mut self, message: BusMessage) -> Vec<CutBlock> {
        let offset = message.position.offset;
        debug_assert_eq!(message.position.partition, self.partition);
        let mut closed = Vec::new();
        if offset < self.next {
            return closed;
        }
        self.next = offset + 1;
        // The span: close the open block, and skip whole empty spans after it.
        if offset >= self.first + BLOCK_SPAN {
            self.close(self.first + BLOCK_SPAN - 1, &mut closed, false);
            self.first += (offset - self.first) / BLOCK_SPAN * BLOCK_SPAN;
        }
        match &message.content {
            Content::Cut => self.close(offset, &mut closed, true),
            Content::Event(bus) => {
                let month = month_of(bus.event.occurred_at_ms);
                if self.month.is_some_and(|open| open != month) {
                    self.close(offset - 1, &mut closed, false);
                }
                self.month = Some(month);
                self.messages.push(message);
            }
            Content::Poison(_) => self.messages.push(message),
        }
        closed
    }

    /// Closes the open block at `last` (answering it when it holds records, or when `marked`);
    /// the next one starts after it.
    fn close(&mut self, last: i64, closed: &mut Vec<CutBlock>, marked: bool) {
        let messages = std::mem::take(&mut self.messages);
        if marked || !messages.is_empty() {
            closed.push(CutBlock {
                partition: self.partition,
                first: self.first,
                last,
                messages,
            });
        }
        self.first = last + 1;
        self.month = None;
        self.marker_asked = false;
    }
}

/// The position after a block: where reading resumes once it is handled.
pub fn after(block: &CutBlock) -> BusPosition {
    BusPosition {
        partition: block.partition,
        offset: block.last + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backends::source::Poison;
    use schemas::event::{BusEvent, RatedEvent};

    const NOV: i64 = 1_795_132_800_000; // 2026-11-21
    const DEC: i64 = 1_796_083_200_000; // 2026-12-02

    fn event(offset: i64, at_ms: i64) -> BusMessage {
        BusMessage {
            position: BusPosition {
                partition: 3,
                offset,
            },
            content: Content::Event(BusEvent {
                tenant_id: "t".into(),
                event: RatedEvent::sample_call(&format!("k{offset}"), at_ms),
            }),
        }
    }

    fn marker(offset: i64) -> BusMessage {
        BusMessage {
            position: BusPosition {
                partition: 3,
                offset,
            },
            content: Content::Cut,
        }
    }

    fn poison(offset: i64) -> BusMessage {
        BusMessage {
            position: BusPosition {
                partition: 3,
                offset,
            },
            content: Content::Poison(Poison {
                reason: "not JSON".into(),
                key: None,
                payload: None,
            }),
        }
    }

    /// Every block closed by feeding `messages` from `first`, as (first, last, offsets).
    fn cut(first: i64, messages: Vec<BusMessage>) -> (Vec<(i64, i64, Vec<i64>)>, Cutter) {
        let mut cutter = Cutter::new(3, first);
        let mut blocks = Vec::new();
        for m in messages {
            for b in cutter.push(m) {
                let offsets = b.messages.iter().map(|m| m.position.offset).collect();
                blocks.push((b.first, b.last, offsets));
            }
        }
        (blocks, cutter)
    }

    #[test]
    fn a_marker_closes_the_open_block_at_its_own_offset() {
        let (blocks, cutter) = cut(
            10,
            vec![
                event(10, NOV),
                poison(11),
                event(12, NOV),
                marker(13),
                event(14, NOV),
            ],
        );
        assert_eq!(blocks, vec![(10, 13, vec![10, 11, 12])]);
        assert_eq!(cutter.first(), 14);
        assert!(cutter.wants_marker());
    }

    #[test]
    fn a_block_never_spans_more_than_the_span_and_empty_spans_are_skipped() {
        let s = BLOCK_SPAN;
        let (blocks, cutter) = cut(
            0,
            vec![
                event(1, NOV),
                event(s - 1, NOV),
                event(s, NOV),
                event(5 * s + 7, NOV),
            ],
        );
        assert_eq!(
            blocks,
            vec![(0, s - 1, vec![1, s - 1]), (s, 2 * s - 1, vec![s])]
        );
        // The block of 5s+7 starts at 5s: where any writer starting at 0 would start it.
        assert_eq!(cutter.first(), 5 * s);
    }

    #[test]
    fn an_event_of_another_month_closes_the_block_before_it() {
        let (blocks, cutter) = cut(
            0,
            vec![
                event(0, NOV),
                poison(1),
                event(2, DEC),
                event(3, DEC),
                event(4, NOV),
            ],
        );
        assert_eq!(blocks, vec![(0, 1, vec![0, 1]), (2, 3, vec![2, 3])]);
        assert_eq!(cutter.first(), 4);
    }

    #[test]
    fn a_marker_on_an_empty_block_closes_it_empty_so_that_its_end_is_recorded() {
        let (blocks, cutter) = cut(0, vec![event(0, NOV), marker(1), marker(2)]);
        assert_eq!(blocks, vec![(0, 1, vec![0]), (2, 2, vec![])]);
        assert_eq!(cutter.first(), 3);
        assert!(!cutter.wants_marker());
    }

    #[test]
    fn a_message_read_again_is_left_out() {
        let (blocks, _) = cut(
            0,
            vec![
                event(0, NOV),
                event(1, NOV),
                event(0, NOV),
                event(1, NOV),
                event(2, NOV),
                marker(3),
            ],
        );
        assert_eq!(blocks, vec![(0, 3, vec![0, 1, 2])]);
    }

    #[test]
    fn a_marker_is_asked_once_per_open_block() {
        let mut cutter = Cutter::new(3, 0);
        cutter.push(event(0, NOV));
        assert!(cutter.wants_marker());
        cutter.marker_asked();
        cutter.push(event(1, NOV));
        assert!(!cutter.wants_marker(), "one marker per block");
        cutter.push(marker(2));
        cutter.push(event(3, NOV));
        assert!(cutter.wants_marker(), "the next block asks again");
    }

    /// Writers that start at any block boundary of one log, and read it in any slices, cut
    /// the same blocks from there on: the property the store's block check rests on.
    #[test]
    fn writers_starting_at_any_boundary_cut_the_same_blocks() {
        let seed = std::env::var("MCP_METER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("seed {seed} (MCP_METER_TEST_SEED={seed} repeats this run)");
        let mut rng = seed;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..50 {
            // A log with gaps, markers, poison and month changes.
            let mut log = Vec::new();
            let mut offset = 0i64;
            for _ in 0..200 {
                offset += 1 + match next(20) {
                    0 => BLOCK_SPAN / 2 + next(BLOCK_SPAN as u64) as i64,
                    _ => 0,
                };
                log.push(match next(10) {
                    0 => marker(offset),
                    1 => poison(offset),
                    2 => event(offset, DEC),
                    _ => event(offset, NOV),
                });
            }
            let copy = |m: &BusMessage| match &m.content {
                Content::Cut => marker(m.position.offset),
                Content::Poison(_) => poison(m.position.offset),
                Content::Event(e) => event(m.position.offset, e.event.occurred_at_ms),
            };
            let (reference, _) = cut(0, log.iter().map(copy).collect());
            // A second writer starts at the boundary after a block of the first one's.
            let k = next(reference.len().max(1) as u64) as usize;
            let start = if k == 0 { 0 } else { reference[k - 1].1 + 1 };
            let (late, _) = cut(
                start,
                log.iter()
                    .filter(|m| m.position.offset >= start)
                    .map(copy)
                    .collect(),
            );
            assert_eq!(late, reference[k..], "seed {seed}");
        }
    }
}
