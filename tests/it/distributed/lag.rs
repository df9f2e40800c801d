//! The lag probe against a real broker.

use super::*;

/// The lag monitor reads the topic from outside the group: each partition's end, and when the
/// first unstored record was written, so the age of what waits is a real figure.
#[test]
fn the_lag_probe_reads_end_offsets_and_when_a_record_was_written() {
    use backends::kafka::KafkaProbe;
    use backends::source::TopicProbe;
    let setup = Setup::new("probe", &kafka_brokers(), 2, "");
    let (_ingestor, client) = setup.ingestor();
    let before = chrono::Utc::now().timestamp_millis();
    let events: Vec<Value> = (0..30)
        .map(|i| call(&format!("p{i}"), "t", "a", &format!("s{i}")))
        .collect();
    assert_eq!(
        client.post("/v1/ingest/batch", ACME, &batch(&events)).0,
        202
    );
    let after = chrono::Utc::now().timestamp_millis();

    let probe = KafkaProbe::new(&setup.config.kafka).unwrap();
    let ends = probe.end_offsets().unwrap();
    assert_eq!(ends.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(ends.iter().map(|(_, end)| end).sum::<i64>(), 30, "{ends:?}");
    for (partition, end) in ends {
        if end == 0 {
            continue;
        }
        let at = probe
            .written_at_ms(partition, 0)
            .unwrap()
            .unwrap_or_else(|| panic!("partition {partition}: no write time for offset 0"));
        assert!(
            (before - 1000..=after + 1000).contains(&at),
            "partition {partition}: written at {at}, posted between {before} and {after}"
        );
    }
}
