//! [`Validity`] to and from a purge log checkpoint ([`crate::purge::log::Checkpoint`]).

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use http::header::HeaderName;

use super::{from_millis, merge, millis, Stamp, Validity, L2_DELETE_GRACE};
use crate::purge::{Pattern, Purge, Target};

impl Validity {
    /// What this corral holds, as a [`crate::purge::log::Checkpoint`]'s records and floor: every
    /// record kept (bans, tag patterns, tags, URLs), with the time and clock of each.
    /// Also returns since when hard URL records are all there (older ones may have been let
    /// go: [`L2_DELETE_GRACE`]).
    pub fn snapshot(&self) -> (Vec<crate::purge::log::Kept>, u64, SystemTime) {
        use crate::purge::log::{Kept, KeptWhat};
        let kept = |s: &Stamp, what: KeptWhat| Kept {
            at_ms: millis(s.at),
            by: s.by,
            soft: s.soft,
            l2: s.l2,
            what,
        };
        let mut out = Vec::new();
        for (ban, s) in self.bans.read().iter() {
            out.push(kept(s, KeptWhat::Ban(ban.clone())));
        }
        for (header, pattern, s) in self.patterns.read().iter() {
            out.push(kept(
                s,
                KeptWhat::TagPattern {
                    header: header.as_str().to_string(),
                    pattern: pattern.as_str().to_string(),
                },
            ));
        }
        for e in self.tags.iter() {
            out.push(kept(e.value(), KeptWhat::Tag { tag: e.key().clone() }));
        }
        for e in self.urls.iter() {
            out.push(kept(
                e.value(),
                KeptWhat::Url {
                    primary: e.key().clone(),
                },
            ));
        }
        let hard_urls_since = SystemTime::now() - L2_DELETE_GRACE - self.skew;
        (out, self.floor_ms.load(Ordering::Acquire), hard_urls_since)
    }

    /// Take the records of a checkpoint another corral wrote, and its floor.
    /// A record that does not rebuild (a pattern that no longer compiles) is covered by the
    /// floor instead.
    pub fn restore(&self, kept: Vec<crate::purge::log::Kept>, floor_ms: u64) {
        use crate::purge::log::KeptWhat;
        // a checkpoint is read from memcached: dates further ahead than the skew (planted, or
        // a clock far off) count from now + the skew, so it cannot switch the cache off
        let latest = crate::purge::millis(crate::purge::now_stamp() + self.skew);
        let floor_ms = floor_ms.min(latest);
        for k in kept {
            let at = from_millis(k.at_ms.min(latest));
            let target = match k.what {
                KeptWhat::Ban(ban) => Some(Target::Ban(ban)),
                KeptWhat::TagPattern { header, pattern } => HeaderName::from_bytes(header.as_bytes())
                    .ok()
                    .zip(Pattern::new(&pattern).ok())
                    .map(|hp| Target::TagPattern { patterns: vec![hp] }),
                KeptWhat::Tag { tag } => Some(Target::Tags(vec![tag])),
                KeptWhat::Url { primary } => {
                    self.record_url(primary, at, k.soft, k.l2, k.by);
                    continue;
                }
            };
            match target {
                Some(target) => self.record_by(&Purge { target, soft: k.soft }, at, k.by),
                None => self.invalidate_all_before(at + self.skew),
            }
        }
        // as the writer had it: a margin added here would be added again by every corral
        // that checkpoints it in turn
        if floor_ms > 0 {
            self.invalidate_all_before(from_millis(floor_ms));
        }
    }

    /// A URL record by its primary key text (from a checkpoint).
    fn record_url(&self, primary: String, at: SystemTime, soft: bool, l2: bool, by: u64) {
        let mut last = self.writer.lock();
        let seq = *last + 1;
        let stamp = Stamp {
            at,
            soft,
            seq,
            l2: l2 || soft,
            by,
        };
        merge(&self.urls, primary, stamp);
        self.fold_map(&self.urls, seq);
        *last = seq;
        self.any.store(true, Ordering::Release);
        self.published.store(seq, Ordering::Release);
    }
}
