//! Disk faults on demand, for tests: a [`StateStore`] wrapper whose writes fail when a test says
//! so, the way a full disk or a dying one fails them (`ENOSPC`, `EIO`). Nothing in production
//! arms it; `ServeOptions::faults` is unset there.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use distillery_proto::v1 as pb;

use crate::machine::{State, Transition};
use crate::store::{Records, StateStore, StoreError, StoreKind};

/// Which write fails from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Everything works.
    None,
    /// `commit` fails with `ENOSPC` and writes nothing.
    CommitNoSpace,
    /// `commit` seems to work but its data never reaches the disk, and `flush` fails with `EIO`
    /// (an fsync error: the dirty pages are lost).
    FlushIo,
}

/// The switch a test holds; clone the `Arc` into `ServeOptions::faults`.
#[derive(Debug)]
pub struct FaultInjection {
    fault: AtomicU8,
    /// Commits swallowed since the fault was armed (they were never acknowledged).
    swallowed: Mutex<u64>,
}

impl Default for FaultInjection {
    fn default() -> Self {
        FaultInjection {
            fault: AtomicU8::new(0),
            swallowed: Mutex::new(0),
        }
    }
}

impl FaultInjection {
    pub fn new() -> Arc<FaultInjection> {
        Arc::new(FaultInjection::default())
    }

    /// Arms (or, with [`Fault::None`], disarms) a fault for every later write.
    pub fn set(&self, f: Fault) {
        let v = match f {
            Fault::None => 0,
            Fault::CommitNoSpace => 1,
            Fault::FlushIo => 2,
        };
        self.fault.store(v, Ordering::SeqCst);
    }

    fn get(&self) -> Fault {
        match self.fault.load(Ordering::SeqCst) {
            1 => Fault::CommitNoSpace,
            2 => Fault::FlushIo,
            _ => Fault::None,
        }
    }

    /// How many commits were swallowed (written nowhere) under [`Fault::FlushIo`].
    pub fn swallowed(&self) -> u64 {
        *self.swallowed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A store whose writes fail as its [`FaultInjection`] says; reads always pass through.
pub struct FaultyStore {
    inner: Arc<dyn StateStore>,
    faults: Arc<FaultInjection>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn StateStore>, faults: Arc<FaultInjection>) -> FaultyStore {
        FaultyStore { inner, faults }
    }
}

fn os_error(code: i32) -> StoreError {
    StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(code)))
}

/// `ENOSPC` and `EIO` on Linux (the numbers are the same on every Unix we build for).
const ENOSPC: i32 = 28;
const EIO: i32 = 5;

impl StateStore for FaultyStore {
    fn load(&self) -> Result<State, StoreError> {
        self.inner.load()
    }

    fn commit(&self, state: &State, t: &Transition) -> Result<(), StoreError> {
        match self.faults.get() {
            Fault::None => self.inner.commit(state, t),
            Fault::CommitNoSpace => Err(os_error(ENOSPC)),
            Fault::FlushIo => {
                *self
                    .faults
                    .swallowed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) += 1;
                Ok(())
            }
        }
    }

    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        if self.faults.get() == Fault::FlushIo {
            return Box::pin(async { Err(os_error(EIO)) });
        }
        self.inner.flush()
    }

    fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError> {
        self.inner.events_from(from, limit)
    }

    fn export(&self) -> Result<Records, StoreError> {
        self.inner.export()
    }

    fn export_is_snapshot(&self) -> bool {
        self.inner.export_is_snapshot()
    }

    fn import(&self, records: &Records) -> Result<(), StoreError> {
        self.inner.import(records)
    }

    fn kind(&self) -> StoreKind {
        self.inner.kind()
    }
}
