//! Log lines a client can cause over and over (a refused purge retried by a CMS, a purge for
//! a site corral never cached), written once per key per interval, with the count of those
//! left out.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Keys remembered at most; past it the map is cleared (a flood of keys costs lines, not
/// memory).
const MAX_KEYS: usize = 10_000;

#[derive(Default)]
pub struct Throttle {
    /// Per key: when it was last written, and how many were left out since.
    last: DashMap<String, (Instant, u64)>,
}

impl Throttle {
    /// `Some(left_out)` when a line for `key` may be written now (at most once per `every`),
    /// with the number of lines left out since the last one; `None` to leave this one out.
    pub fn check(&self, key: &str, every: Duration) -> Option<u64> {
        let now = Instant::now();
        if let Some(mut slot) = self.last.get_mut(key) {
            let (at, left_out) = *slot;
            if now.duration_since(at) < every {
                slot.1 += 1;
                return None;
            }
            *slot = (now, 0);
            return Some(left_out);
        }
        if self.last.len() >= MAX_KEYS {
            self.last.clear();
        }
        self.last.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_per_key_with_the_count_left_out() {
        let t = Throttle::default();
        assert_eq!(t.check("a", Duration::from_secs(60)), Some(0));
        assert_eq!(t.check("a", Duration::from_secs(60)), None);
        assert_eq!(t.check("a", Duration::from_secs(60)), None);
        assert_eq!(t.check("b", Duration::from_secs(60)), Some(0));
        assert_eq!(t.check("a", Duration::ZERO), Some(2));
    }
}
