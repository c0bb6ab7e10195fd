//! Is the loss higher outside the allowed range than inside it, for the same destinations?
//! One-sided tests on 2x2 tables (lost / not lost, outside / inside): Fisher's exact test for
//! one table, and for several (one per destination) the exact conditional test of the summed
//! losses outside (the exact form of Mantel-Haenszel), or Mantel-Haenszel's normal
//! approximation when the counts are too large to enumerate.
//!
//! Pure arithmetic, no allocation beyond the convolution buffer.

use serde::Serialize;

/// One destination's attempts and losses, outside and inside the range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Table {
    pub lost_out: u64,
    pub n_out: u64,
    pub lost_in: u64,
    pub n_in: u64,
}

impl Table {
    pub fn new(lost_out: u64, n_out: u64, lost_in: u64, n_in: u64) -> Self {
        Self {
            lost_out: lost_out.min(n_out),
            n_out,
            lost_in: lost_in.min(n_in),
            n_in,
        }
    }

    /// Whether the table carries information about a difference: attempts on both sides and
    /// both outcomes present (otherwise every arrangement with its margins is the same).
    pub fn informative(&self) -> bool {
        let lost = self.lost_out + self.lost_in;
        let n = self.n_out + self.n_in;
        self.n_out > 0 && self.n_in > 0 && lost > 0 && lost < n
    }

    fn add(&mut self, o: &Table) {
        self.lost_out += o.lost_out;
        self.n_out += o.n_out;
        self.lost_in += o.lost_in;
        self.n_in += o.n_in;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Fisher's exact test (one table) or the exact stratified test (several).
    Exact,
    /// Mantel-Haenszel's chi-square, as a one-sided normal test with continuity correction.
    MantelHaenszel,
}

/// The result of a one-sided test "loss outside > loss inside".
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Test {
    /// Probability of a difference at least this large if the range did not matter.
    pub p_value: f64,
    pub method: Method,
    /// Tables that carried information (destinations seen on both sides, with mixed outcomes).
    pub strata: usize,
    /// The informative tables, summed: what the comparison rests on.
    pub pooled: Table,
}

/// Above this many possible values of the summed statistic, use the normal approximation
/// (by then every table is large and the approximation is good).
const EXACT_LIMIT: u64 = 4000;

/// ln(n!) (exact sum for small n, Stirling's series beyond; error far below 1e-10).
pub fn ln_factorial(n: u64) -> f64 {
    if n < 64 {
        return (2..=n).map(|i| (i as f64).ln()).sum();
    }
    let x = n as f64;
    x * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI * x).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x * x * x)
        + 1.0 / (1260.0 * x.powi(5))
}

fn ln_choose(n: u64, k: u64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// The hypergeometric distribution of losses outside given the table's margins: (lowest
/// possible value, probabilities from there up).
fn hypergeometric(t: &Table) -> (u64, Vec<f64>) {
    let n = t.n_out + t.n_in;
    let k = t.lost_out + t.lost_in;
    let lo = (t.n_out + k).saturating_sub(n);
    let hi = t.n_out.min(k);
    let denom = ln_choose(n, t.n_out);
    let pmf = (lo..=hi)
        .map(|x| (ln_choose(k, x) + ln_choose(n - k, t.n_out - x) - denom).exp())
        .collect();
    (lo, pmf)
}

/// Standard normal upper tail, P(Z >= z) (complementary error function, relative error
/// below 1.2e-7).
pub fn normal_upper_tail(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -a * a - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    let erfc = if x >= 0.0 { erfc } else { 2.0 - erfc };
    (0.5 * erfc).clamp(0.0, 1.0)
}

/// Fisher's exact test, one-sided: is the loss outside higher than inside?
pub fn fisher_greater(t: Table) -> Test {
    stratified_greater(&[t])
}

/// The stratified one-sided test over destinations. Tables without information are
/// ignored; without any informative table the p-value is 1.
pub fn stratified_greater(tables: &[Table]) -> Test {
    let informative: Vec<Table> = tables.iter().copied().filter(Table::informative).collect();
    let mut pooled = Table::default();
    for t in &informative {
        pooled.add(t);
    }
    let strata = informative.len();
    if informative.is_empty() {
        return Test {
            p_value: 1.0,
            method: Method::Exact,
            strata,
            pooled,
        };
    }
    let observed: u64 = informative.iter().map(|t| t.lost_out).sum();
    let width: u64 = informative
        .iter()
        .map(|t| t.n_out.min(t.lost_out + t.lost_in))
        .sum();
    if width <= EXACT_LIMIT {
        // The distribution of the summed losses outside: a convolution of hypergeometrics.
        let mut dist = vec![1.0f64];
        let mut base = 0u64;
        for t in &informative {
            let (lo, pmf) = hypergeometric(t);
            let mut next = vec![0.0; dist.len() + pmf.len() - 1];
            for (i, a) in dist.iter().enumerate() {
                if *a == 0.0 {
                    continue;
                }
                for (j, b) in pmf.iter().enumerate() {
                    next[i + j] += a * b;
                }
            }
            dist = next;
            base += lo;
        }
        let from = observed.saturating_sub(base) as usize;
        let p: f64 = dist.iter().skip(from).sum();
        return Test {
            p_value: p.clamp(0.0, 1.0),
            method: Method::Exact,
            strata,
            pooled,
        };
    }
    let (mut expected, mut variance) = (0.0f64, 0.0f64);
    for t in &informative {
        let n = (t.n_out + t.n_in) as f64;
        let k = (t.lost_out + t.lost_in) as f64;
        let m = t.n_out as f64;
        expected += m * k / n;
        variance += m * (n - m) * k * (n - k) / (n * n * (n - 1.0));
    }
    let p = if variance <= 0.0 {
        1.0
    } else {
        normal_upper_tail((observed as f64 - expected - 0.5) / variance.sqrt())
    };
    Test {
        p_value: p,
        method: Method::MantelHaenszel,
        strata,
        pooled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn factorials() {
        assert!(close(ln_factorial(10), 3_628_800f64.ln(), 1e-12));
        let direct: f64 = (2..=100u64).map(|i| (i as f64).ln()).sum();
        assert!(close(ln_factorial(100), direct, 1e-12));
    }

    #[test]
    fn fisher_matches_the_textbook() {
        // Lady tasting tea: 3 of 4 right in each group, one-sided p = 17/70.
        let t = fisher_greater(Table::new(3, 4, 1, 4));
        assert!(close(t.p_value, 17.0 / 70.0, 1e-9), "{}", t.p_value);
        // All 5 outside lost, all 5 inside answered: 1 / C(10, 5).
        let t = fisher_greater(Table::new(5, 5, 0, 5));
        assert!(close(t.p_value, 1.0 / 252.0, 1e-9), "{}", t.p_value);
        // The other direction is not evidence.
        let t = fisher_greater(Table::new(0, 5, 5, 5));
        assert!(close(t.p_value, 1.0, 1e-9));
    }

    #[test]
    fn uninformative_tables_say_nothing() {
        // A dead destination: everything lost on both sides.
        let t = stratified_greater(&[Table::new(10, 10, 20, 20)]);
        assert_eq!((t.p_value, t.strata), (1.0, 0));
        // No attempts inside.
        let t = stratified_greater(&[Table::new(10, 10, 0, 0)]);
        assert_eq!(t.p_value, 1.0);
    }

    #[test]
    fn strata_are_not_pooled_blindly() {
        // Simpson: destination A is lossy everywhere and mostly outside, B is clean and
        // mostly inside. Pooled, outside looks much worse; within each, no difference.
        let a = Table::new(45, 50, 9, 10);
        let b = Table::new(0, 10, 0, 50);
        let pooled = fisher_greater(Table::new(45, 60, 9, 60));
        assert!(pooled.p_value < 1e-6, "{}", pooled.p_value);
        let s = stratified_greater(&[a, b]);
        assert!(s.p_value > 0.3, "{}", s.p_value);
        assert_eq!(s.strata, 1);
    }

    #[test]
    fn exact_and_normal_agree_on_large_tables() {
        let t = Table::new(2600, 5000, 2300, 5000);
        let mh = stratified_greater(&[t]);
        assert_eq!(mh.method, Method::MantelHaenszel);
        // z about 6: p around 1e-9.
        assert!(mh.p_value < 1e-8 && mh.p_value > 1e-11, "{}", mh.p_value);
        let small = Table::new(260, 500, 230, 500);
        let exact = stratified_greater(&[small]);
        assert_eq!(exact.method, Method::Exact);
        let n = 1000.0f64;
        let z =
            (260.0 - 245.0 - 0.5) / (500.0 * 500.0 * 490.0 * 510.0 / (n * n * (n - 1.0))).sqrt();
        assert!(
            close(exact.p_value, normal_upper_tail(z), 0.1),
            "{}",
            exact.p_value
        );
    }

    #[test]
    fn normal_tail() {
        assert!(close(normal_upper_tail(0.0), 0.5, 1e-6));
        assert!(close(normal_upper_tail(1.959_964), 0.025, 1e-4));
        assert!(close(normal_upper_tail(-1.959_964), 0.975, 1e-5));
        assert!(normal_upper_tail(40.0) < 1e-300);
    }
}
