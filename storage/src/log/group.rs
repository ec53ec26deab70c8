//! The in-memory index of one Raft group's part of the shared log.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::log::record::HardState;
use crate::log::segment::SegmentId;

/// Where an entry's frame lives: 16 bytes per entry in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub segment: SegmentId,
    pub offset: u32,
    pub len: u32,
}

/// The range of indexes a group holds, and what it purged: all a validation needs.
///
/// Entries are `[first, end)`; the log is empty when `first == end`. Appends must follow the last
/// entry, or the purge point when there is none; a group that never held anything takes any start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Span {
    pub first: u64,
    pub end: u64,
    pub purged: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanError {
    NotContiguous { expected: u64 },
    TruncatePurged { purged: u64 },
    IndexOutOfRange,
}

impl Span {
    pub fn is_empty(&self) -> bool {
        self.first == self.end
    }

    pub fn len(&self) -> u64 {
        self.end - self.first
    }

    pub fn expected_next(&self) -> Option<u64> {
        if self.is_empty() {
            self.purged.map(|p| p + 1)
        } else {
            Some(self.end)
        }
    }

    pub fn append(&mut self, index: u64) -> Result<(), SpanError> {
        if let Some(expected) = self.expected_next()
            && index != expected
        {
            return Err(SpanError::NotContiguous { expected });
        }
        let end = index.checked_add(1).ok_or(SpanError::IndexOutOfRange)?;
        if self.is_empty() {
            self.first = index;
        }
        self.end = end;
        Ok(())
    }

    /// Removes entries `>= index`; returns how many went.
    pub fn truncate(&mut self, index: u64) -> Result<u64, SpanError> {
        if let Some(purged) = self.purged
            && index <= purged
        {
            return Err(SpanError::TruncatePurged { purged });
        }
        if index >= self.end {
            return Ok(0);
        }
        let end = index.max(self.first);
        let removed = self.end - end;
        self.end = end;
        Ok(removed)
    }

    /// Removes entries `<= index` and records the purge point; returns how many went, or `None` when
    /// the group already purged as far (a no-op, nothing is written).
    pub fn purge(&mut self, index: u64) -> Result<Option<u64>, SpanError> {
        if self.purged.is_some_and(|p| p >= index) {
            return Ok(None);
        }
        let next = index.checked_add(1).ok_or(SpanError::IndexOutOfRange)?;
        self.purged = Some(index);
        let removed = if self.is_empty() || index >= self.end - 1 {
            let removed = self.len();
            self.first = next;
            self.end = next;
            removed
        } else if index >= self.first {
            let removed = next - self.first;
            self.first = next;
            removed
        } else {
            0
        };
        Ok(Some(removed))
    }
}

/// One group's index, hard state, purge point and read cache.
#[derive(Debug, Default)]
pub(crate) struct GroupLog {
    pub span: Span,
    /// `locs[i]` is entry `span.first + i`.
    pub locs: VecDeque<Loc>,
    /// The caller's bytes for the purge point (for openraft: the purged log id).
    pub marker: Bytes,
    pub hard_state: HardState,
    /// Segment of the newest hard-state record: it pins that segment until rewritten.
    pub hard_state_segment: Option<SegmentId>,
    /// Segment of the newest purge record: it pins that segment until rewritten.
    pub purge_segment: Option<SegmentId>,
    /// `(append sequence number, payload)` of the last `cache.len()` entries: a suffix of the log.
    /// The sequence number tells a live eviction-queue item from one a truncation made stale.
    pub cache: VecDeque<(u64, Bytes)>,
}

impl GroupLog {
    pub fn check_invariants(&self) {
        assert_eq!(self.locs.len() as u64, self.span.len());
        assert!(self.cache.len() <= self.locs.len());
    }

    pub fn cache_first(&self) -> u64 {
        self.span.end - self.cache.len() as u64
    }

    pub fn loc(&self, index: u64) -> Option<Loc> {
        if index < self.span.first || index >= self.span.end {
            return None;
        }
        self.locs
            .get(usize::try_from(index - self.span.first).ok()?)
            .copied()
    }

    pub fn cached(&self, index: u64) -> Option<&(u64, Bytes)> {
        let first = self.cache_first();
        if index < first || index >= self.span.end {
            return None;
        }
        self.cache.get(usize::try_from(index - first).ok()?)
    }

    /// Appends an entry already validated against `span`; returns the cache bytes added.
    pub fn push(&mut self, index: u64, loc: Loc, data: Option<(u64, Bytes)>) -> usize {
        self.span.append(index).expect("validated before encoding");
        self.locs.push_back(loc);
        let added = match data {
            Some((seq, data)) => {
                debug_assert!(self.cache.back().is_none_or(|(last, _)| *last < seq));
                let len = data.len();
                self.cache.push_back((seq, data));
                len
            }
            None => {
                self.cache.clear();
                0
            }
        };
        debug_assert!({
            self.check_invariants();
            true
        });
        added
    }

    /// Starts an empty group's entries at `index`, past its expected next index (recovery only:
    /// the entries in between were in reclaimed segments).
    pub fn resume_at(&mut self, index: u64, loc: Loc) {
        assert!(self.span.is_empty());
        assert!(
            self.span
                .expected_next()
                .is_none_or(|expected| index >= expected)
        );
        self.span.first = index;
        self.span.end = index.checked_add(1).expect("index below u64::MAX");
        self.locs.push_back(loc);
        self.cache.clear();
        self.check_invariants();
    }

    /// Truncates from `index` (validated); calls `removed` for each dropped entry's location and
    /// returns the cache bytes freed.
    pub fn truncate(&mut self, index: u64, mut removed: impl FnMut(Loc)) -> usize {
        let count = self
            .span
            .truncate(index)
            .expect("validated before encoding");
        let mut freed = 0;
        for _ in 0..count {
            removed(self.locs.pop_back().expect("locs match span"));
            // The cache is a suffix: the entry dropped last is the newest cached one, if any.
            freed += self.cache.pop_back().map_or(0, |(_, b)| b.len());
        }
        if self.span.is_empty() {
            self.cache.clear();
        }
        self.check_invariants();
        freed
    }

    /// Drops every entry (the group is being forgotten); calls `removed` for each entry's
    /// location and returns the cache bytes freed.
    pub fn drop_all(&mut self, mut removed: impl FnMut(Loc)) -> usize {
        for loc in self.locs.drain(..) {
            removed(loc);
        }
        self.cache.drain(..).map(|(_, b)| b.len()).sum()
    }

    /// Purges to `index` (validated, not a no-op); calls `removed` for each dropped entry's location
    /// and returns the cache bytes freed.
    pub fn purge(&mut self, index: u64, marker: Bytes, mut removed: impl FnMut(Loc)) -> usize {
        let before = self.span;
        let count = self
            .span
            .purge(index)
            .expect("validated before encoding")
            .expect("not a no-op");
        self.marker = marker;
        let mut freed = 0;
        let cache_first = before.end - self.cache.len() as u64;
        let cache_drop = if self.span.is_empty() {
            self.cache.len() as u64
        } else {
            (index + 1)
                .saturating_sub(cache_first)
                .min(self.cache.len() as u64)
        };
        for _ in 0..cache_drop {
            freed += self.cache.pop_front().map_or(0, |(_, b)| b.len());
        }
        for _ in 0..count {
            removed(self.locs.pop_front().expect("locs match span"));
        }
        self.check_invariants();
        freed
    }

    /// Drops the oldest cached payload if it is entry `index`; returns the bytes freed.
    pub fn evict(&mut self, index: u64) -> usize {
        if !self.cache.is_empty() && self.cache_first() == index {
            self.cache.pop_front().map_or(0, |(_, b)| b.len())
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The span follows Raft's rules: contiguous appends, truncation above the purge point only,
    /// purges that may run past the last entry and then fix the next index.
    #[test]
    fn span_rules() {
        let mut s = Span::default();
        assert_eq!(s.expected_next(), None);
        s.append(5).unwrap();
        s.append(6).unwrap();
        assert_eq!(s.append(8), Err(SpanError::NotContiguous { expected: 7 }));
        assert_eq!(s.truncate(6), Ok(1));
        assert_eq!(s.expected_next(), Some(6));
        assert_eq!(s.purge(5), Ok(Some(1)));
        assert!(s.is_empty());
        assert_eq!(s.expected_next(), Some(6));
        assert_eq!(s.purge(4), Ok(None));
        assert_eq!(s.truncate(5), Err(SpanError::TruncatePurged { purged: 5 }));
        assert_eq!(s.purge(100), Ok(Some(0)));
        assert_eq!(s.expected_next(), Some(101));
        assert_eq!(
            s.append(u64::MAX),
            Err(SpanError::NotContiguous { expected: 101 })
        );
        let mut s = Span::default();
        assert_eq!(s.append(u64::MAX), Err(SpanError::IndexOutOfRange));
    }

    /// The cache stays a suffix of the log through appends, truncations and purges.
    #[test]
    fn cache_is_a_suffix() {
        let mut g = GroupLog::default();
        let loc = Loc {
            segment: 1,
            offset: 16,
            len: 30,
        };
        for i in 1..=5 {
            g.push(i, loc, Some((i, Bytes::from(vec![i as u8; 3]))));
        }
        assert_eq!(g.evict(1), 3);
        assert_eq!(g.evict(3), 0);
        assert_eq!(g.cached(1), None);
        assert_eq!(g.cached(2).map(|(_, b)| b[0]), Some(2));
        let mut gone = 0;
        assert_eq!(g.truncate(4, |_| gone += 1), 6);
        assert_eq!(gone, 2);
        assert_eq!(g.purge(2, Bytes::from_static(b"m"), |_| gone += 1), 3);
        assert_eq!(gone, 4);
        assert_eq!(g.cached(3).map(|(_, b)| b[0]), Some(3));
        assert_eq!(g.loc(3), Some(loc));
        assert_eq!(g.loc(2), None);
    }
}
