//! Ring all-reduce benchmark (not a test): 2 and 4 ranks (threads, loopback TCP) all-reducing a
//! 64 MiB f32 buffer, against a plain loopback copy of the same bytes between two threads, in one
//! run. Reports the algorithm bandwidth (buffer bytes / time) and the bus bandwidth
//! (2(n-1)/n x that: the bytes each rank sends), which is what can approach the copy.
//!
//! `cargo bench -p distillery-worker --bench collective` (env BENCH_MIB = 64, BENCH_REPS = 5).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use distillery_worker::collective::ring::{bind, Ring};
use distillery_worker::collective::Collective;

mod common;
use common::env_usize;

fn loopback_copy(bytes: usize, reps: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let data = vec![7u8; bytes];
    let mut best = f64::INFINITY;
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            let mut buf = vec![0u8; bytes];
            for _ in 0..reps {
                c.read_exact(&mut buf).expect("read");
                c.write_all(&[1]).expect("ack");
            }
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_nodelay(true).expect("nodelay");
        for _ in 0..reps {
            let t = Instant::now();
            c.write_all(&data).expect("write");
            let mut ack = [0u8];
            c.read_exact(&mut ack).expect("ack");
            best = best.min(t.elapsed().as_secs_f64());
        }
        rx.join().expect("receiver");
    });
    best
}

fn ring(n: usize, floats: usize, reps: usize) -> f64 {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().expect("addr")).collect();
    let times: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                s.spawn(move || {
                    let mut ring = Ring::connect(
                        r,
                        l,
                        &addrs,
                        Duration::from_secs(10),
                        Duration::from_secs(60),
                    )
                    .expect("ring");
                    let buf =
                        candle_core::Tensor::new(vec![r as f32; floats], &candle_core::Device::Cpu)
                            .expect("buffer");
                    ring.barrier().expect("barrier");
                    let mut best = f64::INFINITY;
                    for _ in 0..reps {
                        ring.barrier().expect("barrier");
                        let t = Instant::now();
                        ring.all_reduce_sum(&buf).expect("all-reduce");
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    best
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    times.into_iter().fold(0.0, f64::max)
}

fn main() {
    let mib = env_usize("BENCH_MIB", 64);
    let reps = env_usize("BENCH_REPS", 5);
    let bytes = mib << 20;
    let copy = loopback_copy(bytes, reps);
    let copy_gbs = bytes as f64 / copy / 1e9;
    println!(
        "machine: {} threads; buffer {mib} MiB f32; best of {reps}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "  loopback copy (one stream)     {copy_gbs:>6.2} GB/s   {:.3} s",
        copy
    );
    for n in [2usize, 4] {
        let t = ring(n, bytes / 4, reps);
        let algo = bytes as f64 / t / 1e9;
        let bus = algo * 2.0 * (n as f64 - 1.0) / n as f64;
        println!(
            "  ring all-reduce, {n} ranks       {algo:>6.2} GB/s algorithm, {bus:.2} GB/s bus = {:.2}x the copy   {t:.3} s",
            bus / copy_gbs
        );
    }
}
