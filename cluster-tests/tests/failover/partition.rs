//! A shard leader cut off from the others (every proxy into and out of it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use cluster_tests::check::probe_resume;
use cluster_tests::cluster::Options;
use cluster_tests::load::{send_one, Outcome};

use crate::common::*;

/// The leader of the most shards is partitioned away under load. The
/// majority elects new leaders and mail sent to it resumes. The minority
/// node must never answer 250 while it is cut off (its writes cannot
/// commit): it answers 4xx, or nothing within the bound.
/// After healing, the cluster converges and nothing acknowledged is lost.
/// The only messages delivered twice are ones the cut-off leader delivered
/// before its lease ran out: it cannot record their outcome without a
/// majority, so a new leader delivers them again (at-least-once). A message
/// delivered twice for any other reason (after the heal, say) fails it.
#[test]
fn partition_leader_minority_never_acks() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    let load = start_load(&c, paced("partition", 600, 20.0));
    wait_acked(&load, 40);
    let victim = busiest_leader(&c);
    let led = c.shards_led_by(victim).unwrap();
    let victim_smtp = c.node(victim).unwrap().smtp.unwrap();
    let cut_at = Instant::now();
    let cut_wall = SystemTime::now();
    c.partition(victim);
    let elected = wait_new_leaders(&c, &led, victim, Duration::from_secs(20));
    let resume = probe_resume(&c, cut_at, "majority", Duration::from_secs(30)).unwrap();
    // Direct writes to the minority node: 4xx or no answer, never 250.
    let mut minority = Vec::new();
    let probe_end = Instant::now() + Duration::from_secs(40);
    for i in 0..2 {
        if Instant::now() > probe_end {
            break;
        }
        let id = format!("minority-{i}@probe.tern.test");
        let t = Instant::now();
        let o = send_one(victim_smtp, &id, Duration::from_secs(10));
        minority.push((id, o, t.elapsed()));
    }
    for (id, o, t) in &minority {
        eprintln!("partition: minority write {id}: {o:?} after {t:.1?}");
    }
    let heal_at = Instant::now();
    c.heal(victim);
    let report = load.finish();
    let acked_by_minority: Vec<_> = report
        .records
        .iter()
        // A 250 while cut off would be a write that cannot have committed. A
        // message started during the cut may get its 250 after the heal: its
        // entry was truncated then (openraft answers ForwardToLeader) and the
        // node forwarded it to the new leader, which committed it; it is
        // checked with every acknowledged message below.
        .filter(|r| r.node == victim && r.started > cut_at && r.finished < heal_at && r.acked())
        .map(|r| r.message_id.clone())
        .chain(
            minority
                .iter()
                .filter(|(_, o, _)| matches!(o, Outcome::Acked(_)))
                .map(|(id, _, _)| id.clone()),
        )
        .collect();
    let minority_answers = report
        .records
        .iter()
        .filter(|r| r.node == victim && r.started > cut_at && r.started < heal_at)
        .count();
    eprintln!(
        "partition: node {victim} led {led:?}; new leaders after {elected:.1?}; majority resume {resume:?}; \
         {minority_answers} load messages to the minority during the cut"
    );
    assert!(
        acked_by_minority.is_empty(),
        "the partitioned node {victim} acknowledged {acked_by_minority:?}"
    );
    assert!(
        minority.iter().all(|(_, o, _)| match o {
            Outcome::Rejected(r) => r.contains(": 4"),
            Outcome::Broken(_) => true,
            Outcome::Acked(_) => false,
        }),
        "minority replies: {minority:?}"
    );
    let v = assert_nothing_lost("partition_leader_minority_never_acks", &c, &report);
    // The leader's lease (500 ms) bounds its last delivery; 3 s allows a
    // busy machine's scheduling and the sink's write.
    let lease_end = cut_wall + Duration::from_secs(3);
    let mut copies: BTreeMap<String, Vec<cluster_tests::sink::Delivery>> = BTreeMap::new();
    for d in c.sink.deliveries() {
        copies.entry(d.message_id.clone()).or_default().push(d);
    }
    let (mut in_flight, mut unexplained) = (Vec::new(), Vec::new());
    for (id, mut ds) in copies.into_iter().filter(|(_, ds)| ds.len() > 1) {
        ds.sort_by_key(|d| d.at);
        let first = &ds[0];
        if first.node() == Some(victim) && first.at <= lease_end {
            in_flight.push(id);
        } else {
            let by: Vec<_> = ds.iter().map(|d| (d.node(), d.at)).collect();
            unexplained.push(format!("{id}: {by:?}"));
        }
    }
    eprintln!(
        "partition_leader_minority_never_acks: {} duplicates, all delivered first by the cut-off leader within its lease: {in_flight:?}",
        in_flight.len()
    );
    assert!(
        unexplained.is_empty(),
        "delivered twice, not by the cut-off leader within its lease (cut at {cut_wall:?}): {unexplained:?}"
    );
    assert!(v.duplicates <= in_flight.len(), "{v}");
    assert_converged("partition_leader_minority_never_acks", &c, Duration::from_secs(60));
    // Writes through the healed node commit again.
    let healed = send_one(
        c.node(victim).unwrap().smtp.unwrap(),
        "healed@probe.tern.test",
        Duration::from_secs(15),
    );
    assert!(matches!(healed, Outcome::Acked(_)), "after healing: {healed:?}");
    tern_testkit::wait_until(Duration::from_secs(30), "delivery after healing", || {
        !c.sink.deliveries_of("healed@probe.tern.test").is_empty()
    })
    .unwrap();
}

/// Liveness on the minority side: a write to a partitioned shard leader
/// gets a `4xx` (its write cannot commit) within a minute, rather than no
/// answer.
#[test]
fn partition_minority_answers_451() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    let victim = busiest_leader(&c);
    let smtp = c.node(victim).unwrap().smtp.unwrap();
    c.partition(victim);
    let t = Instant::now();
    let o = send_one(smtp, "minority-451@probe.tern.test", Duration::from_secs(60));
    eprintln!("partition_minority_answers_451: {o:?} after {:.1?}", t.elapsed());
    c.heal(victim);
    assert!(
        matches!(&o, Outcome::Rejected(r) if r.contains(": 4")),
        "want a 4xx within 60 s from the partitioned node {victim}, got {o:?}"
    );
}
