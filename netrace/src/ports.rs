//! Port ranges and durations as the command line spells them.

use std::{fmt, str::FromStr, time::Duration};

/// An inclusive range of TCP ports, `start <= end`, both in 1..=65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub const fn new(start: u16, end: u16) -> Self {
        Self { start, end }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    /// Whether all of `other` lies inside `self`.
    pub fn covers(&self, other: &PortRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Number of ports in the range (never zero).
    pub fn count(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// Accepts `A-B` (inclusive) or a single port `A`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let port = |p: &str| -> Result<u16, String> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("'{s}' is not a port range like 32768-65535"))?;
            match u16::try_from(n) {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("'{s}': ports are 1-65535, got {n}")),
            }
        };
        let (start, end) = (port(a)?, port(b)?);
        if start > end {
            return Err(format!("'{s}': the range starts after it ends"));
        }
        Ok(Self { start, end })
    }
}

/// Parses a duration the way `humantime` does (`1500ms`, `3s`, `2m`, `1m30s`, `1h`), or a
/// bare number of seconds. Zero is rejected, and so is more than a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => {
            Duration::from_secs_f64(secs.min(2.0 * YEAR_SECS))
        }
        Ok(_) => Duration::ZERO,
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("'{s}' is not a duration like 500ms, 3s, 1m30s or 1h ({e})"))?,
    };
    if d.is_zero() {
        return Err(format!("'{s}': the duration must be greater than zero"));
    }
    if d.as_secs_f64() > YEAR_SECS {
        return Err(format!("'{s}': the duration must be at most a year"));
    }
    Ok(d)
}

const YEAR_SECS: f64 = 366.0 * 86400.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_reject() {
        assert_eq!("32768-65535".parse(), Ok(PortRange::new(32768, 65535)));
        assert_eq!("80".parse(), Ok(PortRange::new(80, 80)));
        assert!("70000-1".parse::<PortRange>().is_err());
        assert!("a-b".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("20-10".parse::<PortRange>().is_err());
        assert!("".parse::<PortRange>().is_err());
        assert_eq!(PortRange::new(1024, 65535).count(), 64512);
        assert!(PortRange::new(1024, 65535).covers(&PortRange::new(32768, 60999)));
    }

    #[test]
    fn durations_parse_and_reject() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h 5m"), Ok(Duration::from_secs(3900)));
        assert!(parse_duration("400days").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
