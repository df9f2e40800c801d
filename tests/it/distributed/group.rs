//! The consumer group when the broker forgets it: tansu keeps no group across a restart, so the
//! first member to come back is given every partition while the others still hold theirs.
//! Two writers of one partition could each miss the other's rows in their dedup lookups; the
//! aggregator prevents it by making a member that takes partitions over in such a group wait
//! (`TAKEOVER_GRACE`) until their former holder must know it lost them (`still_member`, checked
//! before every insert).

use super::*;
use backends::kafka::KafkaSource;
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

/// The member A holds partitions and stops polling (a batch in hand); the broker crashes and
/// comes back without the group; B, which goes on polling, is given A's partitions. The first
/// records of those that B's poll hands out (to be written) come only once A knows it has lost
/// them, before A has polled again: A's next insert check refuses, and B's dedup lookup comes
/// after anything A sent.
#[test]
fn after_a_broker_restart_a_partition_is_handed_out_only_once_its_former_holder_knows_it_lost_it() {
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
        let mut said = Instant::now();
        loop {
            if said.elapsed() > Duration::from_secs(2) {
                said = Instant::now();
                eprintln!("{:.1} s: B holds {:?}, A still member {}", restarted.elapsed().as_secs_f64(), b.assignment(), a.still_member());
            }
            let polled = b.poll(1000, idle, fill).await.unwrap();
            let taken: Vec<i32> = polled
                .messages
                .iter()
                .map(|m| m.position.partition)
                .filter(|p| held_a.contains(p))
                .collect();
            if !taken.is_empty() {
                eprintln!(
                    "B was handed records of A's partitions {taken:?} {:.1} s after the restart",
                    restarted.elapsed().as_secs_f64()
                );
                assert!(
                    !a.still_member(),
                    "B was handed records of {taken:?} while A, which held them, did not know it had lost them"
                );
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(60),
                "B was not given A's partitions {held_a:?} within 60 s of the restart (B holds {:?})",
                b.assignment()
            );
        }
        // A hears it when it polls, and forgets what it held.
        let polled = a.poll(1000, idle, fill).await.unwrap();
        assert!(
            held_a.iter().all(|p| polled.revoked.contains(p)),
            "A's poll reports {:?} revoked, A held {held_a:?}",
            polled.revoked
        );
    });
}
