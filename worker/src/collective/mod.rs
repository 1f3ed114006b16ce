//! Collectives for data-parallel training over buffers that live on the training device:
//! all-reduce, reduce-scatter and all-gather of flat f32 tensors (in place), a sum of a few host
//! scalars, broadcast, barrier. [`Solo`] is one rank; [`ring::Ring`] is a TCP ring for CPU ranks
//! (the host is their device); `nccl::Nccl` (feature `cuda`) is NCCL on device memory. Rank 0's
//! peers learn each other's addresses through the coordinator's rendezvous (see
//! `tasks/distill.rs`).
//!
//! Shards: a buffer of `len` elements is split into `world_size` contiguous chunks of
//! [`shard_len`] elements (the last one shorter, or empty, when `len` does not divide); rank r
//! owns chunk r ([`shard_range`]). The trainer pads its flat buffers to [`padded_len`] so every
//! chunk has the same length (NCCL's reduce-scatter needs that).

pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};

/// Why a collective failed (a peer died or the network broke): the gang must restart.
#[derive(Debug, thiserror::Error)]
#[error("collective: {0}")]
pub struct CollectiveError(pub String);

impl From<std::io::Error> for CollectiveError {
    fn from(e: std::io::Error) -> Self {
        CollectiveError(e.to_string())
    }
}

impl From<candle_core::Error> for CollectiveError {
    fn from(e: candle_core::Error) -> Self {
        CollectiveError(format!("device buffer: {e}"))
    }
}

/// Elements per shard when `len` elements are split over `world` ranks.
pub fn shard_len(len: usize, world: usize) -> usize {
    len.div_ceil(world.max(1))
}

/// `len` rounded up to a multiple of `world` (every shard the same length).
pub fn padded_len(len: usize, world: usize) -> usize {
    shard_len(len, world) * world.max(1)
}

/// The elements rank `rank` of `world` owns in a buffer of `len` elements.
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    let c = shard_len(len, world);
    (rank * c).min(len)..((rank + 1) * c).min(len)
}

/// What every rank of a gang calls in the same order. Device buffers are contiguous f32 tensors
/// on the rank's training device, changed in place.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `buf` ends with the element-wise sum over ranks.
    fn all_reduce_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError>;
    /// This rank's shard of `buf` ([`shard_range`]) ends with the element-wise sum over ranks of
    /// that shard; the rest of `buf` is left unspecified.
    fn reduce_scatter_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError>;
    /// Every shard of `buf` ends with its owner's values (each rank fills its own shard first).
    fn all_gather(&mut self, buf: &Tensor) -> Result<(), CollectiveError>;
    /// A few host scalars (losses, a squared norm): every rank ends with the sum.
    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank ends with `root`'s bytes.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [0f32];
        self.all_reduce_host(&mut one)
    }
}

/// A gang of one.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn reduce_scatter_sum(&mut self, _buf: &Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&mut self, _buf: &Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_host(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Runs `f` on the elements of a contiguous f32 tensor held in host memory, in place (the
/// tensor's storage is changed: every tensor sharing it sees the change).
pub fn with_host_f32_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> R,
) -> Result<R, CollectiveError> {
    type Body<'a, R> = Box<dyn FnOnce(&mut [f32]) -> R + 'a>;
    struct Op<'a, R> {
        f: RefCell<Option<Body<'a, R>>>,
        out: RefCell<Option<R>>,
    }
    impl<R> InplaceOp1 for Op<'_, R> {
        fn name(&self) -> &'static str {
            "host-f32-mut"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let CpuStorage::F32(v) = s else {
                candle_core::bail!("expected an f32 buffer")
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("expected a contiguous buffer")
            };
            if let Some(f) = self.f.borrow_mut().take() {
                *self.out.borrow_mut() = Some(f(&mut v[a..b]));
            }
            Ok(())
        }
    }
    if t.dtype() != DType::F32 {
        return Err(CollectiveError(format!(
            "device buffer is {:?}, expected f32",
            t.dtype()
        )));
    }
    let op = Op {
        f: RefCell::new(Some(Box::new(f))),
        out: RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| CollectiveError("the buffer is not in host memory".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shards_cover_the_buffer_once_and_padding_evens_them() {
        for (len, world) in [(10, 3), (9, 3), (1, 4), (0, 2), (7, 1)] {
            let mut seen = vec![0; len];
            for r in 0..world {
                for i in shard_range(len, world, r) {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|c| *c == 1), "{len}/{world}");
            let p = padded_len(len, world);
            assert!(p >= len && p.is_multiple_of(world) && p - len < world);
        }
    }

    #[test]
    fn a_host_buffer_is_changed_in_place_and_views_see_it() {
        let t = Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap();
        let view = t.narrow(0, 2, 3).unwrap();
        let n = with_host_f32_mut(&view, |s| {
            s.iter_mut().for_each(|x| *x = 1.0);
            s.len()
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            t.to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
        );
        let bad = Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap();
        assert!(with_host_f32_mut(&bad, |_| ()).is_err());
    }
}
