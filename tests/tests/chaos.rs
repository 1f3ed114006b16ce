//! Chaos: random SIGKILLs of the coordinator and the workers during a two-round campaign, and a
//! network partition between a gang rank and the coordinator. Losing machines must never lose
//! the campaign nor change its result.

use std::sync::Mutex;

use distillery_tests::chaos::{self, ChaosConfig};
use distillery_tests::*;

/// The tests here each run a cluster of real ML workers; on a small CI machine they must not
/// compete for the cores, or heartbeats starve and leases expire for no fault of the test.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// CI's seed. A seed that ever fails is a regression test: add it here.
const CI_SEED: u64 = 20261201;

#[test]
fn a_two_round_campaign_survives_seeded_random_kills_with_the_same_student() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = ChaosConfig::from_env(CI_SEED, 12);
    let report = chaos::run(&cfg, ML_TIMING);
    assert!(
        report.kills.len() >= 10.min(cfg.kills),
        "only {} of {} kills happened before the campaign ended\n{}",
        report.kills.len(),
        cfg.kills,
        report.summary()
    );
    assert_eq!(
        report.state(),
        "succeeded",
        "seed {}: the campaign did not survive\n{}\nstatus {}",
        cfg.seed,
        report.summary(),
        report.status
    );
    assert!(
        report.passed(),
        "seed {}: the student differs from the uninterrupted run's\n{}",
        cfg.seed,
        report.summary()
    );
}
