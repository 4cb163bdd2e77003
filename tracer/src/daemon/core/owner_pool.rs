//! Socket owners stored once each. A server's thousands of connections share one owner, so
//! the table keeps a 4-byte reference per socket instead of a 40-byte copy: 40 MB less at a
//! million sockets.

use std::num::NonZeroU32;

use foldhash::HashMap;

/// The process that owns a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Owner {
    pub pid: u32,
    pub comm: [u8; 16],
    /// Its cgroup v2 id, as the kernel read it with the owner (0: unknown).
    pub cgroup: u64,
}

/// A reference to an owner in an `OwnerPool`; an `Option` of it is still 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OwnerId(NonZeroU32);

impl OwnerId {
    fn slot(self) -> usize {
        self.0.get() as usize - 1
    }
}

/// Owners with a count of the references to each; an owner no socket refers to any more
/// is forgotten and its slot reused, so short-lived processes do not accumulate.
#[derive(Default)]
pub(super) struct OwnerPool {
    slots: Vec<(Owner, u32)>,
    index: HashMap<Owner, OwnerId>,
    free: Vec<OwnerId>,
}

impl OwnerPool {
    /// A new reference to `owner`.
    pub(super) fn acquire(&mut self, owner: Owner) -> OwnerId {
        if let Some(&id) = self.index.get(&owner) {
            self.slots[id.slot()].1 += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id.slot()] = (owner, 1);
                id
            }
            None => {
                self.slots.push((owner, 1));
                let number = u32::try_from(self.slots.len()).expect("under 2^32 owners");
                OwnerId(NonZeroU32::new(number).expect("one or more"))
            }
        };
        self.index.insert(owner, id);
        id
    }

    /// Drops one reference; the owner goes with the last.
    pub(super) fn release(&mut self, id: OwnerId) {
        let (owner, references) = &mut self.slots[id.slot()];
        *references -= 1;
        if *references == 0 {
            self.index.remove(owner);
            self.free.push(id);
        }
    }

    pub(super) fn get(&self, id: OwnerId) -> Owner {
        self.slots[id.slot()].0
    }

    #[cfg(test)]
    /// Owners referred to.
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(pid: u32) -> Owner {
        Owner { pid, comm: *b"server\0\0\0\0\0\0\0\0\0\0", cgroup: 7 }
    }

    #[test]
    fn an_owner_lives_as_long_as_its_references() {
        let mut pool = OwnerPool::default();
        let a = pool.acquire(owner(1));
        assert_eq!(pool.acquire(owner(1)), a, "stored once");
        let b = pool.acquire(owner(2));
        assert_eq!((pool.get(a), pool.get(b), pool.len()), (owner(1), owner(2), 2));
        pool.release(a);
        assert_eq!(pool.get(a), owner(1), "one reference left");
        pool.release(a);
        assert_eq!(pool.len(), 1);
        let c = pool.acquire(owner(3));
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!((pool.get(c), pool.get(b)), (owner(3), owner(2)));
        assert_eq!(pool.slots.len(), 2, "no growth with churning owners");
    }
}
