//! AdamW with f32 master weights and moments, linear warmup then cosine decay, and global-norm
//! gradient clipping.
//!
//! [`FlatAdamW`] is what training runs: the master weights, first and second moments of one
//! shard of the flat parameter vector, in one device tensor, updated in place from the flat
//! gradient buffer, clipping folded in: one pass over each element on the CPU (a fused kernel),
//! candle element-wise ops elsewhere. [`AdamW`] and [`clip_global_norm`] are the same arithmetic
//! over host vectors: the reference the device path is tested against.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};

/// Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine
/// decay to `peak / 10` at `total`.
pub fn lr_at(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let min = peak / 10.0;
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step.saturating_sub(warmup)) as f64 / span).min(1.0);
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * p).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let sq: f64 = grads
        .iter()
        .flatten()
        .map(|g| f64::from(*g) * f64::from(*g))
        .sum();
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().flatten().for_each(|g| *g *= s);
    }
    norm
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for parameters of these sizes.
    pub fn new(sizes: &[usize], weight_decay: f64) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: sizes.iter().map(|n| vec![0.0; *n]).collect(),
            v: sizes.iter().map(|n| vec![0.0; *n]).collect(),
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`. `decay[i]` says whether
    /// parameter i gets weight decay (matrices do, norms do not).
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], decay: &[bool], lr: f64) {
        self.step += 1;
        let k = StepConsts::new(self.beta1, self.beta2, self.eps, self.step, lr);
        for (i, p) in params.iter_mut().enumerate() {
            let wd = if decay[i] {
                (lr * self.weight_decay) as f32
            } else {
                0.0
            };
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            for j in 0..p.len() {
                adamw_element(&mut p[j], &mut m[j], &mut v[j], g[j], &k, wd);
            }
        }
    }
}

/// The f32 arithmetic of one AdamW update of one element (shared by the host reference and the
/// fused kernel, so both round alike). `wd` is `lr · weight_decay` for decayed parameters.
#[inline(always)]
fn adamw_element(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, k: &StepConsts, wd: f32) {
    *m = k.b1 * *m + (1.0 - k.b1) * g;
    *v = k.b2 * *v + (1.0 - k.b2) * g * g;
    *p -= wd * *p;
    *p -= k.step_size * *m / (v.sqrt() / k.c2s + k.eps);
}

/// The constants of one update.
#[derive(Debug, Clone, Copy)]
struct StepConsts {
    b1: f32,
    b2: f32,
    step_size: f32,
    c2s: f32,
    eps: f32,
}

impl StepConsts {
    fn new(beta1: f64, beta2: f64, eps: f64, step: u64, lr: f64) -> StepConsts {
        let c1 = 1.0 - beta1.powi(step as i32);
        let c2 = 1.0 - beta2.powi(step as i32);
        StepConsts {
            b1: beta1 as f32,
            b2: beta2 as f32,
            step_size: (lr / c1) as f32,
            c2s: c2.sqrt() as f32,
            eps: eps as f32,
        }
    }
}

/// A run of elements of the flat parameter vector that share weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// Offset in the flat vector.
    pub start: usize,
    pub len: usize,
    pub decay: bool,
}

/// AdamW over one shard `[lo, lo + len)` of the flat parameter vector: `state` is one f32
/// device tensor `[3 · len]` holding the master weights, then m, then v (elements past the
/// parameters, the padding, stay 0).
pub struct FlatAdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken.
    pub step: u64,
    pub state: Tensor,
    pub lo: usize,
    pub len: usize,
    /// The parameters' runs, in flat order.
    segments: Vec<Segment>,
    /// Run the fused CPU kernel (else candle element-wise ops, as on GPUs).
    pub fused: bool,
}

impl FlatAdamW {
    /// State for the shard `[lo, lo + len)` with the given master weights `[len]` and zero
    /// moments, on the master's device.
    pub fn new(
        master: &Tensor,
        lo: usize,
        segments: Vec<Segment>,
        weight_decay: f64,
    ) -> candle_core::Result<FlatAdamW> {
        let len = master.elem_count();
        let zeros = Tensor::zeros(2 * len, DType::F32, master.device())?;
        let state = Tensor::cat(&[&master.to_dtype(DType::F32)?, &zeros], 0)?;
        Ok(FlatAdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            step: 0,
            state,
            lo,
            len,
            segments,
            fused: master.device().is_cpu(),
        })
    }

    /// The master weights of the shard `[len]` (a view of the state).
    pub fn master(&self) -> candle_core::Result<Tensor> {
        self.state.narrow(0, 0, self.len)
    }

    /// One update from the summed gradients in `grad` (the flat buffer; this shard's elements
    /// are read), scaled by `scale` (clipping), at learning rate `lr`.
    pub fn update(&mut self, grad: &Tensor, scale: f32, lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let k = StepConsts::new(self.beta1, self.beta2, self.eps, self.step, lr);
        let wd = (lr * self.weight_decay) as f32;
        let runs = self.local_runs();
        if self.fused {
            let op = FusedAdamW {
                k,
                wd,
                scale,
                lo: self.lo,
                len: self.len,
                runs,
            };
            return self.state.inplace_op2(grad, &op);
        }
        for (a, n, decay) in runs {
            let g = (grad.narrow(0, self.lo + a, n)? * f64::from(scale))?;
            let p = self.state.narrow(0, a, n)?;
            let m = self.state.narrow(0, self.len + a, n)?;
            let v = self.state.narrow(0, 2 * self.len + a, n)?;
            let m = ((m * f64::from(k.b1))? + (&g * f64::from(1.0 - k.b1))?)?;
            let v = ((v * f64::from(k.b2))? + (g.sqr()? * f64::from(1.0 - k.b2))?)?;
            let p = if decay {
                (&p - (&p * f64::from(wd))?)?
            } else {
                p
            };
            let den = ((v.sqrt()? / f64::from(k.c2s))? + f64::from(k.eps))?;
            let p = (&p - ((&m * f64::from(k.step_size))? / den)?)?;
            self.state.slice_set(&p, 0, a)?;
            self.state.slice_set(&m, 0, self.len + a)?;
            self.state.slice_set(&v, 0, 2 * self.len + a)?;
        }
        Ok(())
    }

    /// The parameter runs inside this shard, as (offset in the shard, length, decay).
    fn local_runs(&self) -> Vec<(usize, usize, bool)> {
        let (lo, hi) = (self.lo, self.lo + self.len);
        self.segments
            .iter()
            .filter_map(|s| {
                let (a, b) = (s.start.max(lo), (s.start + s.len).min(hi));
                (a < b).then(|| (a - lo, b - a, s.decay))
            })
            .collect()
    }
}

/// The fused AdamW kernel: one pass over master, m, v and the gradient of each element.
struct FusedAdamW {
    k: StepConsts,
    wd: f32,
    scale: f32,
    lo: usize,
    len: usize,
    runs: Vec<(usize, usize, bool)>,
}

impl InplaceOp2 for FusedAdamW {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        sl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(state), CpuStorage::F32(grad)) = (s, g) else {
            candle_core::bail!("fused AdamW needs f32 state and gradients")
        };
        let (Some((s0, s1)), Some((g0, g1))) = (sl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("fused AdamW needs contiguous buffers")
        };
        let state = &mut state[s0..s1];
        let grad = &grad[g0..g1];
        let len = self.len;
        if state.len() != 3 * len || grad.len() < self.lo + len {
            candle_core::bail!("fused AdamW: buffers do not match the shard")
        }
        let (p, rest) = state.split_at_mut(len);
        let (m, v) = rest.split_at_mut(len);
        let g = &grad[self.lo..self.lo + len];
        // Element-wise, so splitting across threads changes no result.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = len.div_ceil(threads.max(1)).max(1 << 16);
        std::thread::scope(|sc| {
            for (c, (((p, m), v), g)) in p
                .chunks_mut(chunk)
                .zip(m.chunks_mut(chunk))
                .zip(v.chunks_mut(chunk))
                .zip(g.chunks(chunk))
                .enumerate()
            {
                let base = c * chunk;
                let (k, scale) = (self.k, self.scale);
                let runs = &self.runs;
                sc.spawn(move || {
                    for &(a, n, decay) in runs {
                        let (a, b) = (a.max(base), (a + n).min(base + p.len()));
                        let wd = if decay { self.wd } else { 0.0 };
                        for i in a.saturating_sub(base)..b.saturating_sub(base) {
                            adamw_element(&mut p[i], &mut m[i], &mut v[i], g[i] * scale, &k, wd);
                        }
                    }
                });
            }
        });
        Ok(())
    }
}

/// Sum of squares of a flat f32 buffer's elements `range`, in f64: eight running sums over a
/// fixed interleaving (deterministic) on the CPU, a candle reduction elsewhere.
pub fn sum_squares(buf: &Tensor, range: std::ops::Range<usize>) -> candle_core::Result<f64> {
    let t = buf.narrow(0, range.start, range.len())?;
    if !t.device().is_cpu() {
        return t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>();
    }
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*s else {
        candle_core::bail!("sum of squares needs an f32 buffer")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("sum of squares needs a contiguous buffer")
    };
    let mut acc = [0f64; 8];
    let xs = &v[a..b];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for (s, x) in acc.iter_mut().zip(c) {
            *s += f64::from(*x) * f64::from(*x);
        }
    }
    for (s, x) in acc.iter_mut().zip(it.remainder()) {
        *s += f64::from(*x) * f64::from(*x);
    }
    Ok(acc.iter().sum())
}

/// Adds (or, with `assign`, writes) the gradient `g` (any float dtype, any shape) into the
/// flat f32 buffer `buf` at `offset`, in place: one pass on the CPU, candle ops elsewhere.
pub fn accumulate(
    buf: &Tensor,
    offset: usize,
    g: &Tensor,
    assign: bool,
) -> candle_core::Result<()> {
    let g = g.flatten_all()?;
    if !buf.device().is_cpu() {
        let g = g.to_dtype(DType::F32)?;
        let g = if assign {
            g
        } else {
            (buf.narrow(0, offset, g.elem_count())? + g)?
        };
        return buf.slice_set(&g, 0, offset);
    }
    let g = if matches!(g.dtype(), DType::F32 | DType::BF16) {
        g.contiguous()?
    } else {
        g.to_dtype(DType::F32)?
    };
    buf.inplace_op2(&g, &Accumulate { offset, assign })
}

struct Accumulate {
    offset: usize,
    assign: bool,
}

impl InplaceOp2 for Accumulate {
    fn name(&self) -> &'static str {
        "accumulate-gradient"
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let CpuStorage::F32(d) = d else {
            candle_core::bail!("the gradient buffer must be f32")
        };
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("accumulate needs contiguous buffers")
        };
        let n = s1 - s0;
        if self.offset + n > d1 - d0 {
            candle_core::bail!("gradient past the end of the buffer")
        }
        let dst = &mut d[d0 + self.offset..d0 + self.offset + n];
        match s {
            CpuStorage::F32(s) => {
                let s = &s[s0..s1];
                if self.assign {
                    dst.copy_from_slice(s);
                } else {
                    dst.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                }
            }
            CpuStorage::BF16(s) => {
                let s = &s[s0..s1];
                if self.assign {
                    dst.iter_mut().zip(s).for_each(|(a, b)| *a = b.to_f32());
                } else {
                    dst.iter_mut().zip(s).for_each(|(a, b)| *a += b.to_f32());
                }
            }
            _ => candle_core::bail!("cannot accumulate a gradient that is not f32 or bf16"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth() {
        assert!((lr_at(0, 1.0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, 1.0, 10, 110) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, 1.0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 1.0, 10, 110) - 0.1).abs() < 1e-12);
        assert!(lr_at(30, 1.0, 10, 110) > lr_at(31, 1.0, 10, 110));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0f32, 0.0]];
        assert!((clip_global_norm(&mut g, 1.0) - 5.0).abs() < 1e-9);
        let n: f32 = g.iter().flatten().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
        let mut small = vec![vec![0.3f32]];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small, vec![vec![0.3f32]]);
    }

    #[test]
    fn the_fused_device_adamw_equals_the_composed_one_and_the_host_reference() {
        use candle_core::Device;
        // Two parameters (a decayed matrix of 6, a vector of 3) and padding to 12, in shards.
        let segments = vec![
            Segment {
                start: 0,
                len: 6,
                decay: true,
            },
            Segment {
                start: 6,
                len: 3,
                decay: false,
            },
        ];
        let p0: Vec<f32> = (0..12)
            .map(|i| if i < 9 { 0.3 * i as f32 - 1.0 } else { 0.0 })
            .collect();
        let grads: Vec<Vec<f32>> = (0..4)
            .map(|s| {
                (0..12)
                    .map(|i| {
                        if i < 9 {
                            ((i * 7 + s * 3) % 5) as f32 - 2.0
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        // Host reference: per-parameter vectors, clipping by a scale of 0.5.
        let mut host = vec![p0[..6].to_vec(), p0[6..9].to_vec()];
        let mut opt = AdamW::new(&[6, 3], 0.1);
        for g in &grads {
            let g: Vec<Vec<f32>> = vec![
                g[..6].iter().map(|x| x * 0.5).collect(),
                g[6..9].iter().map(|x| x * 0.5).collect(),
            ];
            opt.update(&mut host, &g, &[true, false], 0.01);
        }
        let want: Vec<f32> = host.concat();
        for fused in [true, false] {
            for (lo, len) in [(0, 12), (0, 6), (6, 6), (4, 4)] {
                let master = Tensor::new(&p0[lo..lo + len], &Device::Cpu).unwrap();
                let mut f = FlatAdamW::new(&master, lo, segments.clone(), 0.1).unwrap();
                f.fused = fused;
                for g in &grads {
                    let g = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                    f.update(&g, 0.5, 0.01).unwrap();
                }
                let got: Vec<f32> = f.master().unwrap().to_vec1().unwrap();
                for (j, x) in got.iter().enumerate() {
                    let i = lo + j;
                    let w = want.get(i).copied().unwrap_or(0.0);
                    assert_eq!(*x, w, "fused={fused} shard {lo}+{len} element {i}");
                }
            }
        }
    }

    #[test]
    fn gradients_accumulate_into_the_flat_buffer_in_any_float_dtype() {
        use candle_core::Device;
        let buf = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        accumulate(&buf, 2, &g, true).unwrap();
        accumulate(&buf, 2, &g.to_dtype(DType::BF16).unwrap(), false).unwrap();
        // A transposed (non-contiguous) gradient is read in its logical order.
        accumulate(&buf, 4, &g.t().unwrap(), false).unwrap();
        assert_eq!(
            buf.to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 2.0, 4.0, 7.0, 11.0, 2.0, 4.0]
        );
        assert!((sum_squares(&buf, 2..4).unwrap() - 20.0).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimizes_a_quadratic_and_its_first_step_is_lr_sized() {
        let mut p = vec![vec![5.0f32, -3.0]];
        let mut opt = AdamW::new(&[2], 0.0);
        let g0 = vec![vec![2.0 * p[0][0], 2.0 * p[0][1]]];
        opt.update(&mut p, &g0, &[true], 0.1);
        // Bias-corrected Adam's first step is lr * sign(g).
        assert!(
            (p[0][0] - 4.9).abs() < 1e-5 && (p[0][1] + 2.9).abs() < 1e-5,
            "{p:?}"
        );
        for _ in 0..2000 {
            let g = vec![vec![2.0 * p[0][0], 2.0 * p[0][1]]];
            opt.update(&mut p, &g, &[true], 0.05);
        }
        assert!(p[0][0].abs() < 0.05 && p[0][1].abs() < 0.05, "{p:?}");
    }
}
