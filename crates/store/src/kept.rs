//! Values read from the store that one node keeps until a change to them is announced: the
//! changing write carries the announcement ([`crate::Batch::announce`]), which reaches the
//! watchers of every node sharing the store ([`crate::Store::watch`]), the writer's included.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use crate::{Store, Table};

/// What an announced key of the watched table means for what is kept.
#[derive(Debug, PartialEq, Eq)]
pub enum Announced<K> {
    /// A change to this value.
    One(K),
    /// A key of another kind (the table holds more than what is kept).
    Nothing,
    /// Anything may have changed.
    Everything,
}

/// Values by key, read on demand and kept until announced changed; at most `max` of them (beyond
/// it, all are forgotten and read again as used).
pub struct Kept<K, V> {
    max: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    values: HashMap<K, V>,
    /// Counts what was forgotten, so that a read that began before a change is not kept.
    forgotten: u64,
}

impl<K: Eq + Hash + Clone + Send + 'static, V: Clone + Send + 'static> Kept<K, V> {
    /// Kept until a key of `table` that `concerns` maps to it is announced.
    pub fn watching(store: &Store, table: Table, max: usize, concerns: fn(&[u8]) -> Announced<K>) -> Arc<Self> {
        let kept = Arc::new(Self { max, inner: Mutex::new(Inner { values: HashMap::new(), forgotten: 0 }) });
        let watcher = Arc::downgrade(&kept);
        store.watch(
            table,
            Arc::new(move |key: Option<&[u8]>| {
                let Some(kept) = watcher.upgrade() else { return };
                match key.map(concerns) {
                    Some(Announced::Nothing) => {}
                    Some(Announced::One(key)) => kept.forget(Some(&key)),
                    // A notification without its key (too long to carry) stands for the table.
                    None | Some(Announced::Everything) => kept.forget(None),
                }
            }),
        );
        kept
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the value of `key` (`None`: every value).
    pub fn forget(&self, key: Option<&K>) {
        let mut inner = self.lock();
        match key {
            Some(key) => {
                inner.values.remove(key);
            }
            None => inner.values.clear(),
        }
        inner.forgotten += 1;
    }

    /// The value of `key`, [`Self::get_many`] for one.
    pub fn get<E>(&self, key: &K, read: impl FnOnce(&K) -> Result<Option<V>, E>) -> Result<Option<V>, E> {
        let mut values = self.get_many(std::slice::from_ref(key), |keys| Ok(vec![read(&keys[0])?]))?;
        Ok(values.pop().flatten())
    }

    /// The values of `keys`, in their order: those kept, and the others `read` (in one go,
    /// without the lock). What it finds is kept; what it does not (`None`: not stored, perhaps
    /// not yet) is read again next time.
    pub fn get_many<E>(&self, keys: &[K], read: impl FnOnce(&[K]) -> Result<Vec<Option<V>>, E>) -> Result<Vec<Option<V>>, E> {
        let (mut values, wanted, forgotten) = {
            let inner = self.lock();
            let values: Vec<Option<V>> = keys.iter().map(|key| inner.values.get(key).cloned()).collect();
            let wanted: Vec<K> = keys.iter().zip(&values).filter(|(_, value)| value.is_none()).map(|(key, _)| key.clone()).collect();
            (values, wanted, inner.forgotten)
        };
        if wanted.is_empty() {
            return Ok(values);
        }
        let mut read = read(&wanted)?.into_iter();
        let mut found = Vec::new();
        for (key, value) in keys.iter().zip(values.iter_mut()).filter(|(_, value)| value.is_none()) {
            *value = read.next().flatten();
            if let Some(value) = value {
                found.push((key.clone(), value.clone()));
            }
        }
        self.keep(forgotten, found);
        Ok(values)
    }

    /// Keeps what was read while nothing was forgotten: a change meanwhile may have been read
    /// or not.
    fn keep(&self, forgotten: u64, read: impl IntoIterator<Item = (K, V)>) {
        let mut inner = self.lock();
        if inner.forgotten != forgotten {
            return;
        }
        for (key, value) in read {
            if inner.values.len() >= self.max {
                inner.values.clear();
            }
            inner.values.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(max: usize) -> Kept<u32, String> {
        Kept { max, inner: Mutex::new(Inner { values: HashMap::new(), forgotten: 0 }) }
    }

    type Reads = std::cell::RefCell<Vec<Vec<u32>>>;

    fn read_all(reads: &Reads) -> impl FnOnce(&[u32]) -> Result<Vec<Option<String>>, ()> + '_ {
        move |keys: &[u32]| {
            reads.borrow_mut().push(keys.to_vec());
            Ok(keys.iter().map(|key| (*key != 0).then(|| format!("v{key}"))).collect())
        }
    }

    #[test]
    fn what_was_found_is_kept_in_order_and_what_was_not_is_read_again() {
        let kept = kept(10);
        let reads = Reads::default();
        assert_eq!(kept.get_many(&[1, 0, 2], read_all(&reads)), Ok(vec![Some("v1".into()), None, Some("v2".into())]));
        assert_eq!(kept.get_many(&[2, 0, 3, 1], read_all(&reads)), Ok(vec![Some("v2".into()), None, Some("v3".into()), Some("v1".into())]));
        assert_eq!(*reads.borrow(), vec![vec![1, 0, 2], vec![0, 3]], "only the absent and the new were read again");
        kept.forget(Some(&1));
        assert_eq!(kept.get(&1, |_| Ok::<_, ()>(Some("new".to_owned()))), Ok(Some("new".into())));
        assert_eq!(kept.get(&2, |_| Err(())), Ok(Some("v2".into())), "2 is still kept");
    }

    #[test]
    fn a_read_that_began_before_a_change_is_not_kept() {
        let kept = kept(10);
        // The change is announced while the value is being read: what was read may be either.
        assert_eq!(kept.get(&1, |_| {
            kept.forget(Some(&1));
            Ok::<_, ()>(Some("maybe stale".to_owned()))
        }), Ok(Some("maybe stale".into())));
        assert_eq!(kept.get(&1, |_| Ok::<_, ()>(Some("fresh".to_owned()))), Ok(Some("fresh".into())), "read again");
    }

    #[test]
    fn beyond_its_bound_it_starts_again() {
        let kept = kept(2);
        let reads = Reads::default();
        kept.get_many(&[1, 2, 3], read_all(&reads)).unwrap();
        assert!(kept.lock().values.len() <= 2);
    }
}
