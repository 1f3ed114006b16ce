//! A TCP ring for CPU ranks, over buffers in host memory (a CPU rank's device). Each rank
//! connects to the next and accepts the previous one. The buffer is split into `world_size`
//! chunks ([`shard_range`]); a reduce-scatter passes partial sums around the ring (after `n - 1`
//! steps rank r holds the full sum of chunk r, its shard), an all-gather passes the shards
//! around, and an all-reduce is the two. Transfers move at most a bucket at a time, so the
//! scratch memory is two buckets however large the buffer. Every step sends and receives at
//! once (a sender thread), so no rank blocks on a full socket.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use std::ops::Range;

use candle_core::Tensor;

use super::{shard_range, with_host_f32_mut, Collective, CollectiveError};

/// Floats per transfer: bounds the scratch memory (two pieces) whatever the buffer's size.
pub const BUCKET: usize = 1 << 20;

/// One rank's links in the ring.
pub struct Ring {
    rank: usize,
    n: usize,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    bucket: usize,
    /// Scratch for one outgoing and one incoming piece, kept across collectives.
    out: Vec<f32>,
    inp: Vec<f32>,
    /// Alive while the ring is: the cancel watcher (see [`Ring::abort_when`]) stops with it.
    alive: Arc<()>,
}

fn err(m: impl Into<String>) -> CollectiveError {
    CollectiveError(m.into())
}

/// Binds this rank's listener on `ip` (port chosen by the system); its address goes to the
/// other ranks through the rendezvous.
pub fn bind(ip: IpAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip, 0))
}

impl Ring {
    /// Connects rank `rank` of `addrs.len()` ranks: to `addrs[rank + 1]`, and accepts rank
    /// `rank - 1` on `listener`. Fails after `timeout` if a peer does not show up. Once
    /// connected, a peer silent for `io_timeout` fails the collective.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addrs: &[SocketAddr],
        timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Ring, CollectiveError> {
        let n = addrs.len();
        if rank >= n {
            return Err(err(format!("rank {rank} of {n}")));
        }
        if n == 1 {
            return Ok(Ring {
                rank,
                n,
                next: None,
                prev: None,
                bucket: BUCKET,
                out: Vec::new(),
                inp: Vec::new(),
                alive: Arc::new(()),
            });
        }
        let deadline = Instant::now() + timeout;
        let target = addrs[(rank + 1) % n];
        let want_prev = (rank + n - 1) % n;
        let (next, prev) = std::thread::scope(|s| {
            let connector = s.spawn(move || -> Result<TcpStream, CollectiveError> {
                loop {
                    match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                        Ok(mut st) => {
                            st.write_all(&(rank as u32).to_le_bytes())?;
                            return Ok(st);
                        }
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            return Err(err(format!("rank {rank}: cannot reach {target}: {e}")))
                        }
                    }
                }
            });
            listener.set_nonblocking(true)?;
            let prev = loop {
                match listener.accept() {
                    Ok((mut st, _)) => {
                        st.set_nonblocking(false)?;
                        st.set_read_timeout(Some(Duration::from_secs(10)))?;
                        let mut b = [0u8; 4];
                        st.read_exact(&mut b)?;
                        let r = u32::from_le_bytes(b) as usize;
                        if r != want_prev {
                            return Err(err(format!(
                                "rank {rank}: expected rank {want_prev} to connect, got rank {r}"
                            )));
                        }
                        break st;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(err(format!(
                                "rank {rank}: rank {want_prev} did not connect within {timeout:?}"
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let next = connector
                .join()
                .map_err(|_| err("connector thread panicked"))??;
            Ok::<_, CollectiveError>((next, prev))
        })?;
        for st in [&next, &prev] {
            st.set_nodelay(true)?;
            st.set_read_timeout(Some(io_timeout))?;
            st.set_write_timeout(Some(io_timeout))?;
        }
        Ok(Ring {
            rank,
            n,
            next: Some(next),
            prev: Some(prev),
            bucket: BUCKET,
            out: Vec::new(),
            inp: Vec::new(),
            alive: Arc::new(()),
        })
    }

    /// Ends any collective in progress, with an error, soon after `flag` is set (a revoked
    /// lease): a rank whose peer stalls (a partition, not a death) would otherwise wait out the
    /// whole `io_timeout` before its attempt can end. A watcher thread checks the flag every
    /// 100 ms and shuts both sockets down; it ends when the ring is dropped.
    pub fn abort_when(self, flag: Arc<AtomicBool>) -> Result<Ring, CollectiveError> {
        let streams: Vec<TcpStream> = [&self.next, &self.prev]
            .into_iter()
            .flatten()
            .map(TcpStream::try_clone)
            .collect::<Result<_, _>>()?;
        if streams.is_empty() {
            return Ok(self);
        }
        let alive: Weak<()> = Arc::downgrade(&self.alive);
        std::thread::Builder::new()
            .name("ring-cancel".into())
            .spawn(move || {
                while alive.upgrade().is_some() {
                    if flag.load(Ordering::SeqCst) {
                        for st in &streams {
                            let _ = st.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })?;
        Ok(self)
    }

    /// Sets the bucket size (floats).
    pub fn with_bucket(mut self, floats: usize) -> Ring {
        self.bucket = floats.max(1);
        self
    }

    /// Sends `out` to the next rank while receiving `inp.len()` floats from the previous one
    /// (native byte order: every rank of a gang runs this same build).
    fn exchange(&mut self, out: &[f32], inp: &mut [f32]) -> Result<(), CollectiveError> {
        let out: &[u8] = bytemuck::cast_slice(out);
        let inp: &mut [u8] = bytemuck::cast_slice_mut(inp);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Err(err("ring not connected"));
        };
        std::thread::scope(|s| {
            let sender = s.spawn(move || next.write_all(out));
            let r = prev.read_exact(inp);
            let w = sender.join().map_err(|_| err("sender thread panicked"))?;
            w?;
            r?;
            Ok(())
        })
    }

    /// Ring reduce-scatter over `x` split into `world_size` chunks ([`shard_range`]): afterwards
    /// rank r's chunk r holds the sum over ranks. Step s sends chunk (r - s - 1) and adds the
    /// received chunk (r - s - 2) into place; each transfer moves at most `bucket` floats, so
    /// the scratch memory is two buckets whatever the buffer's size.
    fn reduce_scatter_slice(&mut self, x: &mut [f32]) -> Result<(), CollectiveError> {
        let n = self.n;
        if n == 1 {
            return Ok(());
        }
        let len = x.len();
        let mut out = std::mem::take(&mut self.out);
        let mut inp = std::mem::take(&mut self.inp);
        let r = (|| {
            for s in 0..n - 1 {
                let send = shard_range(len, n, (self.rank + 2 * n - s - 1) % n);
                let recv = shard_range(len, n, (self.rank + 2 * n - s - 2) % n);
                let pieces = send.len().max(recv.len()).div_ceil(self.bucket);
                for k in 0..pieces {
                    let sp = piece(&send, k, self.bucket);
                    let rp = piece(&recv, k, self.bucket);
                    out.clear();
                    out.extend_from_slice(&x[sp]);
                    inp.resize(rp.len(), 0.0);
                    self.exchange(&out, &mut inp)?;
                    for (v, r) in x[rp].iter_mut().zip(&inp) {
                        *v += r;
                    }
                }
            }
            Ok(())
        })();
        self.out = out;
        self.inp = inp;
        r
    }

    /// Ring all-gather: rank r's chunk r goes to every rank. Step s sends chunk (r - s) and
    /// receives chunk (r - s - 1) straight into place.
    fn all_gather_slice(&mut self, x: &mut [f32]) -> Result<(), CollectiveError> {
        let n = self.n;
        if n == 1 {
            return Ok(());
        }
        let len = x.len();
        let mut out = std::mem::take(&mut self.out);
        let r = (|| {
            for s in 0..n - 1 {
                let send = shard_range(len, n, (self.rank + n - s) % n);
                let recv = shard_range(len, n, (self.rank + 2 * n - s - 1) % n);
                let pieces = send.len().max(recv.len()).div_ceil(self.bucket);
                for k in 0..pieces {
                    let sp = piece(&send, k, self.bucket);
                    let rp = piece(&recv, k, self.bucket);
                    out.clear();
                    out.extend_from_slice(&x[sp]);
                    self.exchange(&out, &mut x[rp])?;
                }
            }
            Ok(())
        })();
        self.out = out;
        r
    }

    fn all_reduce_slice(&mut self, x: &mut [f32]) -> Result<(), CollectiveError> {
        self.reduce_scatter_slice(x)?;
        self.all_gather_slice(x)
    }
}

/// The `k`-th piece of at most `bucket` elements of `r` (empty past its end).
fn piece(r: &Range<usize>, k: usize, bucket: usize) -> Range<usize> {
    let a = (r.start + k * bucket).min(r.end);
    a..(a + bucket).min(r.end)
}

impl Collective for Ring {
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
        with_host_f32_mut(buf, |x| self.all_reduce_slice(x))?
    }

    fn reduce_scatter_sum(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        with_host_f32_mut(buf, |x| self.reduce_scatter_slice(x))?
    }

    fn all_gather(&mut self, buf: &Tensor) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        with_host_f32_mut(buf, |x| self.all_gather_slice(x))?
    }

    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_slice(buf)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if self.n == 1 {
            return Ok(());
        }
        let last = (root + self.n - 1) % self.n;
        if self.rank != root {
            let prev = self
                .prev
                .as_mut()
                .ok_or_else(|| err("ring not connected"))?;
            let mut len = [0u8; 8];
            prev.read_exact(&mut len)?;
            buf.resize(u64::from_le_bytes(len) as usize, 0);
            prev.read_exact(buf)?;
        }
        if self.rank != last {
            let next = self
                .next
                .as_mut()
                .ok_or_else(|| err("ring not connected"))?;
            next.write_all(&(buf.len() as u64).to_le_bytes())?;
            next.write_all(buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Runs `f` on `n` connected ranks in threads and returns their results in rank order.
    pub(crate) fn gang<T: Send>(
        n: usize,
        bucket: usize,
        f: impl Fn(&mut Ring) -> T + Sync,
    ) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let addrs = addrs.clone();
                    let f = &f;
                    s.spawn(move || {
                        let mut ring = Ring::connect(
                            r,
                            l,
                            &addrs,
                            Duration::from_secs(10),
                            Duration::from_secs(10),
                        )
                        .unwrap()
                        .with_bucket(bucket);
                        f(&mut ring)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn host(v: &[f32]) -> Tensor {
        Tensor::new(v, &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn the_ring_sum_equals_a_plain_sum_for_sizes_that_do_not_divide_evenly() {
        for n in [2usize, 3, 4] {
            for len in [0usize, 1, 2, 5, 7, 1000, 10_007] {
                // Small buckets (many rounds) on the small sizes only: debug builds are slow.
                let buckets: &[usize] = if len <= 100 {
                    &[3, 1 << 20]
                } else {
                    &[1 << 20]
                };
                for &bucket in buckets {
                    let input = |r: usize| -> Vec<f32> {
                        (0..len)
                            .map(|i| ((i * 7 + r * 13) % 97) as f32 - 40.0)
                            .collect()
                    };
                    let inputs: Vec<Vec<f32>> = (0..n).map(input).collect();
                    let want: Vec<f32> = (0..len)
                        .map(|i| inputs.iter().map(|v| v[i]).sum())
                        .collect();
                    let got = gang(n, bucket, |ring| {
                        let t = host(&input(ring.rank()));
                        ring.all_reduce_sum(&t).unwrap();
                        let mut h = input(ring.rank());
                        ring.all_reduce_host(&mut h).unwrap();
                        (t.to_vec1::<f32>().unwrap(), h)
                    });
                    for (r, (v, h)) in got.iter().enumerate() {
                        assert_eq!(v, &want, "n={n} len={len} bucket={bucket} rank={r}");
                        assert_eq!(h, &want, "host n={n} len={len} bucket={bucket} rank={r}");
                    }
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_leaves_each_rank_its_shard_summed_and_all_gather_spreads_the_shards() {
        for n in [2usize, 3, 4] {
            for len in [4usize, 12, 1001] {
                for bucket in [5usize, 1 << 20] {
                    let input = |r: usize| -> Vec<f32> {
                        (0..len).map(|i| ((i * 3 + r * 11) % 23) as f32).collect()
                    };
                    let sums: Vec<f32> = (0..len)
                        .map(|i| (0..n).map(|r| input(r)[i]).sum())
                        .collect();
                    let got = gang(n, bucket, |ring| {
                        let r = ring.rank();
                        let t = host(&input(r));
                        ring.reduce_scatter_sum(&t).unwrap();
                        let scattered = t.to_vec1::<f32>().unwrap();
                        // Each rank writes a value of its own into its shard, then gathers.
                        let mine = shard_range(len, n, r);
                        let mut g = vec![-1.0f32; len];
                        for i in mine {
                            g[i] = (r * 1000 + i) as f32;
                        }
                        let g = host(&g);
                        ring.all_gather(&g).unwrap();
                        (scattered, g.to_vec1::<f32>().unwrap())
                    });
                    for (r, (scattered, gathered)) in got.iter().enumerate() {
                        for i in shard_range(len, n, r) {
                            assert_eq!(scattered[i], sums[i], "n={n} len={len} rank={r} i={i}");
                        }
                        for (i, x) in gathered.iter().enumerate() {
                            let owner = i / crate::collective::shard_len(len, n);
                            assert_eq!(*x, (owner * 1000 + i) as f32, "n={n} len={len} r={r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn broadcast_and_barrier_reach_every_rank() {
        let got = gang(3, 1 << 20, |ring| {
            let mut b = if ring.rank() == 1 {
                b"from rank one".to_vec()
            } else {
                Vec::new()
            };
            ring.broadcast(&mut b, 1).unwrap();
            ring.barrier().unwrap();
            b
        });
        for b in got {
            assert_eq!(b, b"from rank one");
        }
    }

    #[test]
    fn a_dead_peer_fails_the_collective_instead_of_hanging() {
        let l0 = bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let l1 = bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let a2 = addrs.clone();
        let h = std::thread::spawn(move || {
            // Rank 1 connects, then goes away.
            let ring = Ring::connect(1, l1, &a2, Duration::from_secs(10), Duration::from_secs(10));
            drop(ring);
        });
        let mut r0 = Ring::connect(
            0,
            l0,
            &addrs,
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap();
        h.join().unwrap();
        let v = host(&[1.0f32; 1000]);
        let e = r0.all_reduce_sum(&v).unwrap_err();
        // The surviving rank's attempt is lost, not failed: the task did nothing wrong.
        let t = crate::runner::TaskError::from(e);
        assert!(t.lost && t.retryable, "{t:?}");
        assert!(t.message.starts_with("collective: "), "{}", t.message);
    }

    #[test]
    fn a_revoked_lease_ends_a_collective_stalled_on_a_silent_peer() {
        let l0 = bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let l1 = bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let a2 = addrs.clone();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        // Rank 1 connects and then stays silent (a partition), keeping its sockets open.
        let h = std::thread::spawn(move || {
            let ring = Ring::connect(1, l1, &a2, Duration::from_secs(10), Duration::from_secs(60));
            let _ = hold_rx.recv();
            drop(ring);
        });
        let flag = Arc::new(AtomicBool::new(false));
        let mut r0 = Ring::connect(
            0,
            l0,
            &addrs,
            Duration::from_secs(10),
            Duration::from_secs(60),
        )
        .unwrap()
        .abort_when(flag.clone())
        .unwrap();
        let f = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            f.store(true, Ordering::SeqCst);
        });
        let t0 = Instant::now();
        let v = host(&[1.0f32; 1000]);
        assert!(r0.all_reduce_sum(&v).is_err());
        // Well before the 60 s io_timeout.
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let _ = hold_tx.send(());
        h.join().unwrap();
    }
}
