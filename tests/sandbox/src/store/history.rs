//! A bounded window of recent events, so a watch that starts from a
//! resourceVersion gets what happened since, or 410 Gone when that is older
//! than the window (as etcd compaction makes it on a real cluster).

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Event, StoreError};

const CAPACITY: usize = 20_000;

#[derive(Default)]
pub struct History {
    events: VecDeque<Arc<Event>>,
}

impl History {
    pub fn push(&mut self, event: Arc<Event>) {
        if self.events.len() == CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Events with a revision above `rv`. `current` is the store's revision.
    pub fn since(&self, rv: u64, current: u64) -> Result<Vec<Arc<Event>>, StoreError> {
        if rv >= current {
            return Ok(Vec::new());
        }
        let oldest = self.events.front().map_or(current + 1, |e| e.rv);
        // Everything after `rv` must still be here: the first kept event must be rv+1 or older.
        if oldest > rv + 1 {
            return Err(StoreError::Gone(rv));
        }
        Ok(self.events.iter().filter(|e| e.rv > rv).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventType;

    fn ev(rv: u64) -> Arc<Event> {
        Arc::new(Event {
            rv,
            kind: EventType::Added,
            resource: "pods".into(),
            namespace: String::new(),
            object: serde_json::Value::Null,
        })
    }

    #[test]
    fn old_revisions_are_gone_once_dropped() {
        let mut h = History::default();
        for rv in 1..=(CAPACITY as u64 + 5) {
            h.push(ev(rv));
        }
        let now = CAPACITY as u64 + 5;
        assert_eq!(h.since(1, now).err(), Some(StoreError::Gone(1)));
        assert_eq!(h.since(now - 2, now).map(|v| v.len()), Ok(2));
        assert_eq!(h.since(now, now).map(|v| v.len()), Ok(0));
    }
}
