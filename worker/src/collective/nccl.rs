//! NCCL collectives for GPU ranks (feature `cuda`): one communicator per rank on candle's own
//! CUDA stream; rank 0 creates the unique id and shares its 128 bytes through the coordinator's
//! rendezvous. Buffers are host slices (the trainer's flat gradients), copied to the device,
//! reduced in place, and copied back.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError};

fn err(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError(format!("nccl: {e:?}"))
}

/// A new unique id (rank 0), as the bytes the other ranks need.
pub fn new_id() -> Result<Vec<u8>, CollectiveError> {
    let id = Id::new().map_err(err)?;
    Ok(id.internal().iter().map(|c| *c as u8).collect())
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl Nccl {
    /// Joins the communicator named by `id` (from [`new_id`]) as `rank` of `world` on `device`.
    pub fn connect(
        device: &candle_core::Device,
        rank: usize,
        world: usize,
        id: &[u8],
    ) -> Result<Nccl, CollectiveError> {
        let candle_core::Device::Cuda(d) = device else {
            return Err(CollectiveError("NCCL needs a CUDA device".into()));
        };
        if id.len() != 128 {
            return Err(CollectiveError(format!(
                "NCCL id of {} bytes, expected 128",
                id.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (a, b) in internal.iter_mut().zip(id) {
            *a = *b as std::ffi::c_char;
        }
        let stream = d.cuda_stream();
        let comm =
            Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(err)?;
        Ok(Nccl { comm, stream })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(&*buf).map_err(err)?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(err)?;
        self.stream.memcpy_dtoh(&d, buf).map_err(err)?;
        self.stream.synchronize().map_err(err)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        let mut len = [buf.len() as u64];
        let mut dl = self.stream.clone_htod(&len[..]).map_err(err)?;
        self.comm
            .broadcast_in_place(&mut dl, root as i32)
            .map_err(err)?;
        self.stream.memcpy_dtoh(&dl, &mut len[..]).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        buf.resize(len[0] as usize, 0);
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(&buf[..]).map_err(err)?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(err)?;
        self.stream.memcpy_dtoh(&d, &mut buf[..]).map_err(err)?;
        self.stream.synchronize().map_err(err)
    }
}
