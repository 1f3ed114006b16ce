//! A gang of ranks that are threads of one process, on any device (several ranks may share one
//! GPU, which NCCL refuses): each rank publishes its buffer, the ranks meet at a barrier, and
//! each computes its result from the others' buffers with device tensor ops. Used by `worker
//! gpu-check` (a 2-rank sharded step on one GPU) and by tests.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::Tensor;

use super::{shard_range, Collective, CollectiveError};

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Option<Tensor>>>,
    bytes: Mutex<Vec<u8>>,
    host: Mutex<Vec<Vec<f32>>>,
}

/// One rank of an in-process gang (see [`LocalGang::new`]).
pub struct LocalGang {
    rank: usize,
    n: usize,
    shared: Arc<Shared>,
}

impl LocalGang {
    /// The `n` ranks of a new gang, to be moved into one thread each.
    pub fn new(n: usize) -> Vec<LocalGang> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            barrier: Barrier::new(n),
            slots: Mutex::new(vec![None; n]),
            bytes: Mutex::new(Vec::new()),
            host: Mutex::new(vec![Vec::new(); n]),
        });
        (0..n)
            .map(|rank| LocalGang {
                rank,
                n,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `buf`, waits for every rank, runs `f` on all ranks' buffers, waits again (so
    /// no rank changes its buffer while another still reads it).
    fn exchange(
        &mut self,
        buf: &Tensor,
        f: impl FnOnce(&[Tensor]) -> candle_core::Result<()>,
    ) -> Result<(), CollectiveError> {
        Self::lock(&self.shared.slots)[self.rank] = Some(buf.clone());
        self.shared.barrier.wait();
        let all: Vec<Tensor> = Self::lock(&self.shared.slots)
            .iter()
            .map(|s| {
                s.clone()
                    .ok_or_else(|| CollectiveError("a rank did not publish".into()))
            })
            .collect::<Result<_, _>>()?;
        // The sums are computed into fresh tensors first: every rank reads the others' inputs
        // before any rank writes (the second barrier).
        let r = f(&all);
        self.shared.barrier.wait();
        Self::lock(&self.shared.slots)[self.rank] = None;
        r.map_err(CollectiveError::from)
    }

    /// The sum over ranks of elements `range` of their buffers (summed in rank order).
    fn sum(all: &[Tensor], range: std::ops::Range<usize>) -> candle_core::Result<Tensor> {
        let mut acc = all[0].narrow(0, range.start, range.len())?.copy()?;
        for t in &all[1..] {
            acc = (acc + t.narrow(0, range.start, range.len())?)?;
        }
        Ok(acc)
    }
}

impl Collective for LocalGang {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.n
    }

    fn all_reduce_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        let len = buf.elem_count();
        let mut sum = None;
        self.exchange(buf, |all| {
            sum = Some(Self::sum(all, 0..len)?);
            Ok(())
        })?;
        if let Some(s) = sum {
            buf.slice_set(&s, 0, 0)?;
        }
        self.shared.barrier.wait();
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        let mine = shard_range(buf.elem_count(), self.n, self.rank);
        let mut sum = None;
        self.exchange(buf, |all| {
            sum = Some(Self::sum(all, mine.clone())?);
            Ok(())
        })?;
        if let Some(s) = sum {
            buf.slice_set(&s, 0, mine.start)?;
        }
        self.shared.barrier.wait();
        Ok(())
    }

    fn all_gather(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        let len = buf.elem_count();
        let (rank, n) = (self.rank, self.n);
        let mut parts = Vec::new();
        self.exchange(buf, |all| {
            for (r, t) in all.iter().enumerate() {
                let s = shard_range(len, n, r);
                if r != rank && !s.is_empty() {
                    parts.push((s.start, t.narrow(0, s.start, s.len())?.copy()?));
                }
            }
            Ok(())
        })?;
        for (at, p) in parts {
            buf.slice_set(&p, 0, at)?;
        }
        self.shared.barrier.wait();
        Ok(())
    }

    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        Self::lock(&self.shared.host)[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let all = Self::lock(&self.shared.host);
            for (i, x) in buf.iter_mut().enumerate() {
                *x = all.iter().map(|v| v.get(i).copied().unwrap_or(0.0)).sum();
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        if self.rank == root {
            *Self::lock(&self.shared.bytes) = buf.clone();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            *buf = Self::lock(&self.shared.bytes).clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_in_process_gang_reduces_scatters_and_gathers_like_the_ring() {
        let len = 10;
        let gang = LocalGang::new(3);
        type RankResult = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>);
        let out: Vec<RankResult> = std::thread::scope(|s| {
            let hs: Vec<_> = gang
                .into_iter()
                .map(|mut g| {
                    s.spawn(move || {
                        let r = g.rank();
                        let input: Vec<f32> = (0..len).map(|i| (i * (r + 1)) as f32).collect();
                        let a = Tensor::new(input.as_slice(), &Device::Cpu).unwrap();
                        g.all_reduce_sum(&a).unwrap();
                        let b = Tensor::new(input.as_slice(), &Device::Cpu).unwrap();
                        g.reduce_scatter_sum(&b).unwrap();
                        let mut c: Vec<f32> = vec![-1.0; len];
                        for i in shard_range(len, 3, r) {
                            c[i] = (100 * r + i) as f32;
                        }
                        let c = Tensor::new(c.as_slice(), &Device::Cpu).unwrap();
                        g.all_gather(&c).unwrap();
                        let mut bytes = if r == 2 { b"two".to_vec() } else { vec![] };
                        g.broadcast(&mut bytes, 2).unwrap();
                        (
                            a.to_vec1().unwrap(),
                            b.to_vec1().unwrap(),
                            c.to_vec1().unwrap(),
                            bytes,
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let sums: Vec<f32> = (0..len).map(|i| (i * 6) as f32).collect();
        for (r, (a, b, c, bytes)) in out.iter().enumerate() {
            assert_eq!(a, &sums);
            for i in shard_range(len, 3, r) {
                assert_eq!(b[i], sums[i]);
            }
            for (i, x) in c.iter().enumerate() {
                assert_eq!(*x, (100 * (i / 4) + i) as f32);
            }
            assert_eq!(bytes, b"two");
        }
    }
}
