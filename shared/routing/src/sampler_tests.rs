use super::Sampler;

#[test]
fn sampler_picks_the_percentage_within_a_few_calls() {
    for percent in [0.0, 1.0, 5.0, 33.3, 50.0, 95.0, 100.0] {
        let s = Sampler::new(0.618_033_988_749_895);
        let picked = (0..2_000).filter(|_| s.pick(percent)).count() as f64;
        let share = picked / 20.0;
        assert!((share - percent).abs() < 0.5, "{percent}%: picked {share}%");
    }
}

#[test]
fn two_samplers_are_not_in_lockstep() {
    let (a, b) = (
        Sampler::new(0.618_033_988_749_895),
        Sampler::new(0.414_213_562_373_095),
    );
    let both = (0..2_000).filter(|_| a.pick(50.0) & b.pick(50.0)).count();
    // Independent halves overlap on about a quarter of the calls.
    assert!((400..600).contains(&both), "{both}");
}

/// Each sampler starts at a random place: over many new ones (each reload makes them anew),
/// the first call is picked in about the share asked, neither always (n = 0 picks for every
/// percentage) nor never.
#[test]
fn the_first_calls_of_new_samplers_are_picked_in_the_share() {
    for step in [
        0.618_033_988_749_895,
        0.414_213_562_373_095,
        0.732_050_807_568_877,
    ] {
        let first = (0..2_000).filter(|_| Sampler::new(step).pick(10.0)).count();
        assert!((100..300).contains(&first), "{step}: {first} of 2000");
    }
}
