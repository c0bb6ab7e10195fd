//! Small statistics over samples.

/// The median; 0 for no samples.
pub fn median(samples: &[f64]) -> f64 {
    let mut s: Vec<f64> = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The mean of the samples without the highest 1 % (interrupts, preemption); 0 for none.
pub fn trimmed_mean(samples: &[f64]) -> f64 {
    let mut s: Vec<f64> = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let keep = s.len() - s.len() / 100;
    if keep == 0 {
        return 0.0;
    }
    s[..keep].iter().sum::<f64>() / keep as f64
}

/// Rounds to `digits` decimals, for JSON that people read.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_means() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let mut v = vec![1.0; 99];
        v.push(1000.0);
        assert_eq!(trimmed_mean(&v), 1.0);
        assert_eq!(round(1.23456, 2), 1.23);
    }
}
