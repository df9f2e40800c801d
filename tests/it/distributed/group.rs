//! The consumer group when the broker was away: a member whose session ran out rejoins, and
//! tansu hands it every partition at once while the other members still hold theirs (until
//! they poll, or for as long as they have not noticed). Two writers of one partition could
//! each miss the other's rows in their dedup lookups; the aggregator prevents it: a member
//! given a partition it did not hold just before waits `TAKEOVER_GRACE` before writing it, and
//! a member checks before every insert that its assignment is not lost (`still_member`).

use super::*;
use backends::kafka::{KafkaSource, TAKEOVER_GRACE};
use backends::source::EventSource;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Writes `n` records on each of the topic's partitions.
fn produce(setup: &Setup, n: usize) {
    let kafka = &setup.config.kafka;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers.as_deref().unwrap())
        .create()
        .unwrap();
    for p in 0..kafka.partitions {
        for i in 0..n {
            let payload = format!("record {i}");
            producer
                .send(
                    BaseRecord::<(), str>::to(&kafka.events_topic)
                        .partition(p)
                        .payload(&payload),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The partition of each record `polled` hands out of `partitions`.
fn records_of(polled: &backends::source::Polled, partitions: &[i32]) -> Vec<i32> {
    polled
        .messages
        .iter()
        .map(|m| m.position.partition)
        .filter(|p| partitions.contains(p))
        .collect()
}

/// The member A holds partitions and stops polling (a batch in hand); the broker is away for a
/// session timeout and comes back; B, which went on polling, is given A's partitions while A
/// still holds them. B's poll hands out none of their records (to be written) before the grace
/// has passed, and A's next poll (after its batch) takes them from A and hands out none of them.
/// A may or may not have noticed before that poll (librdkafka's assignment_lost, which A checks
/// before every insert), depending on whether its own session ran out while the broker was away:
/// the grace is what covers the batch A had in hand.
#[test]
fn a_partition_taken_over_after_the_broker_was_away_waits_the_grace_and_its_former_holder_lets_go()
{
    let mut tansu = Tansu::start();
    let setup = Setup::new("forgotten", &tansu.brokers(), 4, "");
    produce(&setup, 5);
    actix_web::rt::System::new().block_on(async {
        let kafka = &setup.config.kafka;
        let mut a = KafkaSource::new(kafka).unwrap();
        let mut b = KafkaSource::new(kafka).unwrap();
        let (idle, fill) = (Duration::from_millis(100), Duration::from_millis(20));
        let joined = Instant::now();
        loop {
            a.poll(1000, idle, fill).await.unwrap();
            b.poll(1000, idle, fill).await.unwrap();
            let (held_a, held_b) = (a.assignment(), b.assignment());
            if !held_a.is_empty() && !held_b.is_empty() && held_a.len() + held_b.len() == 4 {
                break;
            }
            assert!(
                joined.elapsed() < Duration::from_secs(60),
                "the two members did not share the partitions: A {held_a:?}, B {held_b:?}"
            );
        }
        let held_a = a.assignment();
        assert!(a.still_member(), "A holds {held_a:?}");
        eprintln!("A holds {held_a:?}, B holds {:?}", b.assignment());

        // The broker is away for a session timeout (6 s), B polling all along (as an idle
        // aggregator does), then comes back on the same storage.
        tansu.crash();
        let away = Instant::now();
        while away.elapsed() < Duration::from_millis(setup.config.kafka.session_timeout_ms) {
            b.poll(1000, idle, fill).await.unwrap();
        }
        tansu.start_again();
        produce(&setup, 5);
        let restarted = Instant::now();
        // The start of the poll after which B was first seen holding one of A's partitions: B
        // was given it after this instant.
        let mut given_after: Option<Instant> = None;
        loop {
            let call = Instant::now();
            let polled = b.poll(1000, idle, fill).await.unwrap();
            if given_after.is_none() && b.assignment().iter().any(|p| held_a.contains(p)) {
                given_after = Some(call);
            }
            let taken = records_of(&polled, &held_a);
            if !taken.is_empty() {
                eprintln!(
                    "B was handed records of A's partitions {taken:?} {:.1} s after the restart; \
A knew it had lost them: {}",
                    restarted.elapsed().as_secs_f64(),
                    !a.still_member()
                );
                let waited = given_after.expect("B holds them").elapsed();
                assert!(
                    waited >= TAKEOVER_GRACE,
                    "B handed out records of partitions it took over {waited:?} after it was given them, \
before the grace of {TAKEOVER_GRACE:?}"
                );
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(60),
                "B was not given A's partitions {held_a:?} within 60 s of the restart (B holds {:?})",
                b.assignment()
            );
        }
        // A, done with the batch it had in hand (which the grace waited for), polls again as an
        // aggregator does: it is told that what it held is gone, and is handed none of it.
        let polled = a.poll(1000, idle, fill).await.unwrap();
        let handed = records_of(&polled, &held_a);
        assert!(
            held_a.iter().all(|p| polled.revoked.contains(p)) && handed.is_empty(),
            "A's next poll reports {:?} revoked and hands out records of {handed:?}; A held {held_a:?}, \
B now holds {:?}",
            polled.revoked,
            b.assignment()
        );
    });
}
