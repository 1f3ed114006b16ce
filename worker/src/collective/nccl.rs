//! NCCL collectives for GPU ranks (feature `cuda`): one communicator per rank on candle's own
//! CUDA stream; rank 0 creates the unique id and shares its 128 bytes through the coordinator's
//! rendezvous. Buffers are the trainer's flat device tensors, reduced in place in device memory;
//! reduce-scatter and all-gather go through one shard-sized device buffer (NCCL's out-of-place
//! forms). Only the few host scalars travel host → device → host.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor};

use super::{Collective, CollectiveError};

fn err(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError(format!("nccl: {e:?}"))
}

/// NCCL's result code (`NcclError`'s own Debug prints no code).
fn nerr(e: NcclError) -> CollectiveError {
    CollectiveError(format!("nccl: {:?}", e.0))
}

/// A new unique id (rank 0), as the bytes the other ranks need.
pub fn new_id() -> Result<Vec<u8>, CollectiveError> {
    let id = Id::new().map_err(nerr)?;
    Ok(id.internal().iter().map(|c| *c as u8).collect())
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// One shard's device buffer for reduce-scatter and all-gather (NCCL's out-of-place forms).
    shard: Option<Tensor>,
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
        // ncclCommInitRank joins on the thread's current device: make it this one.
        stream.context().bind_to_thread().map_err(err)?;
        let comm =
            Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(nerr)?;
        Ok(Nccl {
            comm,
            stream,
            shard: None,
        })
    }
}

/// The range of `l`'s elements in its storage (a contiguous layout).
fn span(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous buffer".into()))?;
    Ok(a..b)
}

fn cerr(e: NcclError) -> candle_core::Error {
    candle_core::Error::Msg(format!("nccl: {:?}", e.0))
}

/// In-place all-reduce (sum) of a device buffer.
struct AllReduce<'a>(&'a Comm);

impl InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL needs a CUDA buffer")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let r = span(l)?;
        let mut v = s.as_cuda_slice_mut::<f32>()?.slice_mut(r);
        self.0
            .all_reduce_in_place(&mut v, &ReduceOp::Sum)
            .map_err(cerr)?;
        Ok(())
    }
}

/// Reduce-scatter (sum) of the source buffer into the destination (one shard).
struct ReduceScatter<'a>(&'a Comm);

impl InplaceOp2 for ReduceScatter<'_> {
    fn name(&self) -> &'static str {
        "nccl-reduce-scatter"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("NCCL needs a CUDA buffer")
    }
    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (dr, sr) = (span(dl)?, span(sl)?);
        let send = src.as_cuda_slice::<f32>()?.slice(sr);
        let mut recv = dst.as_cuda_slice_mut::<f32>()?.slice_mut(dr);
        self.0
            .reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
            .map_err(cerr)?;
        Ok(())
    }
}

/// All-gather of the source (one shard) into the destination (the whole buffer).
struct AllGather<'a>(&'a Comm);

impl InplaceOp2 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("NCCL needs a CUDA buffer")
    }
    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (dr, sr) = (span(dl)?, span(sl)?);
        let send = src.as_cuda_slice::<f32>()?.slice(sr);
        let mut recv = dst.as_cuda_slice_mut::<f32>()?.slice_mut(dr);
        self.0.all_gather(&send, &mut recv).map_err(cerr)?;
        Ok(())
    }
}

impl Nccl {
    /// A device buffer of one shard of `buf`, kept across steps.
    fn scratch(&mut self, buf: &Tensor) -> Result<Tensor, CollectiveError> {
        let n = self.comm.world_size();
        if buf.dtype() != DType::F32 || buf.rank() != 1 || buf.elem_count() % n != 0 {
            return Err(CollectiveError(format!(
                "NCCL shards need a flat f32 buffer of a multiple of {n} elements, got {:?} {:?}",
                buf.dtype(),
                buf.shape()
            )));
        }
        let len = buf.elem_count() / n;
        match &self.shard {
            Some(t) if t.elem_count() == len => Ok(t.clone()),
            _ => {
                let t = Tensor::zeros(len, DType::F32, buf.device())?;
                self.shard = Some(t.clone());
                Ok(t)
            }
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        if buf.elem_count() == 0 {
            return Ok(());
        }
        buf.inplace_op1(&AllReduce(&self.comm))?;
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        let shard = self.scratch(buf)?;
        if shard.elem_count() == 0 {
            return Ok(());
        }
        shard.inplace_op2(buf, &ReduceScatter(&self.comm))?;
        buf.slice_set(&shard, 0, self.comm.rank() * shard.elem_count())?;
        Ok(())
    }

    fn all_gather(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        let shard = self.scratch(buf)?;
        let len = shard.elem_count();
        if len == 0 {
            return Ok(());
        }
        shard.slice_set(&buf.narrow(0, self.comm.rank() * len, len)?, 0, 0)?;
        buf.inplace_op2(&shard, &AllGather(&self.comm))?;
        Ok(())
    }

    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(&*buf).map_err(err)?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(nerr)?;
        self.stream.memcpy_dtoh(&d, buf).map_err(err)?;
        self.stream.synchronize().map_err(err)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        let mut len = [buf.len() as u64];
        let mut dl = self.stream.clone_htod(&len[..]).map_err(err)?;
        self.comm
            .broadcast_in_place(&mut dl, root as i32)
            .map_err(nerr)?;
        self.stream.memcpy_dtoh(&dl, &mut len[..]).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        buf.resize(len[0] as usize, 0);
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(&buf[..]).map_err(err)?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(nerr)?;
        self.stream.memcpy_dtoh(&d, &mut buf[..]).map_err(err)?;
        self.stream.synchronize().map_err(err)
    }
}
