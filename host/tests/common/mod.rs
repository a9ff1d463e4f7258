//! Helpers shared by the host's integration tests.

/// ‖ours − theirs‖ / ‖theirs‖ in f64, the measure every logits comparison here reports.
pub fn relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len(), "different lengths");
    let diff: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let norm: f64 = theirs.iter().map(|b| f64::from(*b).powi(2)).sum();
    (diff / norm).sqrt()
}
