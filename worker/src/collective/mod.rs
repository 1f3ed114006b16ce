//! Collectives for data-parallel training: all-reduce of flat f32 buffers, broadcast, barrier.
//! [`Solo`] is one rank; [`ring::Ring`] is a TCP ring for CPU ranks (reduce-scatter then
//! all-gather, bucketed); `nccl::Nccl` (feature `cuda`) is NCCL for GPU ranks. Rank 0's peers learn each other's addresses through the coordinator's
//! rendezvous (see `tasks/distill.rs`).

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

/// Why a collective failed (a peer died or the network broke): the gang must restart.
#[derive(Debug, thiserror::Error)]
#[error("collective: {0}")]
pub struct CollectiveError(pub String);

impl From<std::io::Error> for CollectiveError {
    fn from(e: std::io::Error) -> Self {
        CollectiveError(e.to_string())
    }
}

/// What every rank of a gang calls in the same order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank ends with the element-wise sum over ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank ends with `root`'s bytes.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;

    /// Every rank ends with the element-wise mean over ranks.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)?;
        let n = self.world_size() as f32;
        if n > 1.0 {
            buf.iter_mut().for_each(|x| *x /= n);
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
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
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}
