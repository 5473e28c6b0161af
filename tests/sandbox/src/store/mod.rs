//! The object store: every API object as JSON, one global resourceVersion
//! counter, and the event history that watches replay and follow.
//!
//! It knows nothing of kinds or validation (that is `api::registry`); it only
//! keeps objects keyed by (resource, namespace, name), stamps
//! `metadata.resourceVersion`, checks update preconditions and fans events out.

mod history;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

pub use history::History;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    /// The resource key (`pods`, `deployments.apps`).
    pub resource: String,
    pub namespace: String,
    pub object: Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    /// The caller's resourceVersion is not the stored one.
    #[error("conflict")]
    Conflict,
    /// A watch asked for history that was already dropped.
    #[error("too old resource version: {0}")]
    Gone(u64),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

type Key = (String, String); // (namespace, name); namespace "" for cluster-scoped.

#[derive(Default)]
struct State {
    rv: u64,
    objects: HashMap<String, BTreeMap<Key, Value>>,
    history: History,
}

/// The shared store. Cheap to clone behind an `Arc`.
pub struct Store {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Event>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// A live watch: events already past (replayed) and the receiver of new ones.
pub struct Subscription {
    pub replay: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(16 * 1024);
        Self { state: Mutex::new(State::default()), events }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current resourceVersion (of the last write).
    pub fn revision(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.lock();
        st.objects.get(resource)?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Objects of a resource, in one namespace or all (`None`), with the
    /// revision they are consistent with.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let st = self.lock();
        let items = match st.objects.get(resource) {
            None => Vec::new(),
            Some(map) => map
                .iter()
                .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                .map(|(_, v)| v.clone())
                .collect(),
        };
        (items, st.rv)
    }

    pub fn create(&self, resource: &str, namespace: &str, name: &str, mut object: Value) -> Result<Value> {
        let mut st = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        if st.objects.get(resource).is_some_and(|m| m.contains_key(&key)) {
            return Err(StoreError::AlreadyExists);
        }
        st.rv += 1;
        let rv = st.rv;
        set_rv(&mut object, rv);
        st.objects.entry(resource.to_owned()).or_default().insert(key, object.clone());
        self.emit(&mut st, EventType::Added, resource, namespace, object.clone());
        Ok(object)
    }

    /// Replaces an object. With `expected_rv`, fails with `Conflict` unless it
    /// is the stored resourceVersion.
    pub fn update(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        mut object: Value,
        expected_rv: Option<&str>,
    ) -> Result<Value> {
        let mut st = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let current = st.objects.get(resource).and_then(|m| m.get(&key)).ok_or(StoreError::NotFound)?;
        if let Some(expected) = expected_rv
            && rv_of(current) != Some(expected)
        {
            return Err(StoreError::Conflict);
        }
        st.rv += 1;
        let rv = st.rv;
        set_rv(&mut object, rv);
        st.objects.entry(resource.to_owned()).or_default().insert(key, object.clone());
        self.emit(&mut st, EventType::Modified, resource, namespace, object.clone());
        Ok(object)
    }

    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Result<Value> {
        let mut st = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = st.objects.get_mut(resource).and_then(|m| m.remove(&key)).ok_or(StoreError::NotFound)?;
        st.rv += 1;
        let rv = st.rv;
        // The DELETED event carries the object at the revision of its deletion.
        set_rv(&mut object, rv);
        self.emit(&mut st, EventType::Deleted, resource, namespace, object.clone());
        Ok(object)
    }

    /// Subscribes to every event after `since` (all new ones when `None`).
    pub fn subscribe(&self, since: Option<u64>) -> Result<Subscription> {
        let st = self.lock();
        let replay = match since {
            None => Vec::new(),
            Some(rv) => st.history.since(rv, st.rv)?,
        };
        Ok(Subscription { replay, live: self.events.subscribe() })
    }

    fn emit(&self, st: &mut State, kind: EventType, resource: &str, namespace: &str, object: Value) {
        let event =
            Arc::new(Event { rv: st.rv, kind, resource: resource.to_owned(), namespace: namespace.to_owned(), object });
        st.history.push(event.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }
}

pub fn rv_of(object: &Value) -> Option<&str> {
    object.pointer("/metadata/resourceVersion").and_then(Value::as_str)
}

fn set_rv(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}})
    }

    #[test]
    fn create_get_update_delete_bump_the_revision() {
        let s = Store::new();
        let a = s.create("pods", "default", "a", obj("a")).unwrap();
        assert_eq!(rv_of(&a), Some("1"));
        assert_eq!(s.create("pods", "default", "a", obj("a")), Err(StoreError::AlreadyExists));
        assert_eq!(s.update("pods", "default", "a", obj("a"), Some("0")), Err(StoreError::Conflict));
        let a2 = s.update("pods", "default", "a", obj("a"), Some("1")).unwrap();
        assert_eq!(rv_of(&a2), Some("2"));
        assert_eq!(s.list("pods", Some("default")).0.len(), 1);
        assert_eq!(s.list("pods", Some("other")).0.len(), 0);
        assert!(s.delete("pods", "default", "a").is_ok());
        assert_eq!(s.get("pods", "default", "a"), None);
        assert_eq!(s.delete("pods", "default", "a"), Err(StoreError::NotFound));
        assert_eq!(s.revision(), 3);
    }

    #[test]
    fn subscribe_replays_events_after_a_revision() {
        let s = Store::new();
        s.create("pods", "default", "a", obj("a")).unwrap();
        s.create("pods", "default", "b", obj("b")).unwrap();
        let sub = s.subscribe(Some(1)).unwrap();
        assert_eq!(sub.replay.len(), 1);
        assert_eq!(sub.replay[0].object["metadata"]["name"], "b");
    }
}
