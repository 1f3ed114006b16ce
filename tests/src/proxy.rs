//! A loopback TCP proxy that a test can partition: `cut` stops forwarding in both directions
//! while keeping every socket open (bytes already sent wait, as on a link that went dark with
//! TCP retransmitting underneath), `heal` delivers what was held and carries on. That models a
//! network partition, not a crash: the process on the far side keeps running and talks again
//! once the link is back, so its late messages reach the coordinator.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct Link {
    cut: Mutex<bool>,
    healed: Condvar,
    stop: AtomicBool,
    /// Every socket of every connection, so `Drop` can close them.
    sockets: Mutex<Vec<TcpStream>>,
    forwarded: AtomicU64,
    /// Bytes read while the link was cut and delivered after it healed.
    held: AtomicU64,
    connections: AtomicU64,
}

impl Link {
    /// Blocks while the link is cut; false when the proxy is shutting down.
    fn wait_healed(&self) -> bool {
        let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        while *cut {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            cut = self
                .healed
                .wait_timeout(cut, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        !self.stop.load(Ordering::SeqCst)
    }

    fn is_cut(&self) -> bool {
        *self.cut.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A proxy from `127.0.0.1:port` to `upstream`, closed (every socket shut) when dropped.
pub struct LinkProxy {
    pub port: u16,
    link: Arc<Link>,
    acceptor: Option<JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`, which must be
    /// a loopback address.
    pub fn start(upstream: SocketAddr) -> LinkProxy {
        assert!(upstream.ip().is_loopback(), "the proxy is loopback only");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let link = Arc::new(Link::default());
        let l = link.clone();
        let acceptor = std::thread::spawn(move || {
            while !l.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        // A connection opened during a cut is accepted but carries nothing until
                        // the link heals (a SYN that waits, in effect).
                        let Ok(up) = TcpStream::connect(upstream) else {
                            let _ = down.shutdown(Shutdown::Both);
                            continue;
                        };
                        let _ = up.set_nodelay(true);
                        let _ = down.set_nodelay(true);
                        l.connections.fetch_add(1, Ordering::SeqCst);
                        pump(&l, &down, &up);
                        pump(&l, &up, &down);
                        let mut s = l.sockets.lock().unwrap_or_else(|p| p.into_inner());
                        s.extend([down, up]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        LinkProxy {
            port,
            link,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, the address to give the worker instead of the coordinator's.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding, in both directions; sockets stay open.
    pub fn cut(&self) {
        *self.link.cut.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Forwards again, first what was held during the cut.
    pub fn heal(&self) {
        *self.link.cut.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.link.healed.notify_all();
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.link.forwarded.load(Ordering::SeqCst)
    }

    /// Bytes that arrived while the link was cut and were delivered after it healed.
    pub fn held(&self) -> u64 {
        self.link.held.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.link.connections.load(Ordering::SeqCst)
    }
}

/// At most this much is queued per direction during a cut; then the proxy stops reading and
/// TCP flow control holds the sender.
const HOLD_LIMIT: usize = 16 << 20;

/// Copies `from` to `to` on a thread of its own; while the link is cut, what arrives is queued
/// and delivered, in order, once it heals.
fn pump(link: &Arc<Link>, from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let link = link.clone();
    // A read timeout lets the thread notice a heal and shutdown.
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut queued: Vec<u8> = Vec::new();
        let mut eof = false;
        while !link.stop.load(Ordering::SeqCst) {
            if link.is_cut() {
                if queued.len() >= HOLD_LIMIT || eof {
                    if !link.wait_healed() {
                        break;
                    }
                    continue;
                }
            } else if !queued.is_empty() {
                if to.write_all(&queued).is_err() {
                    break;
                }
                link.forwarded
                    .fetch_add(queued.len() as u64, Ordering::SeqCst);
                link.held.fetch_add(queued.len() as u64, Ordering::SeqCst);
                queued.clear();
            }
            if eof {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    continue;
                }
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(_) => break,
            };
            if link.is_cut() {
                queued.extend_from_slice(&buf[..n]);
            } else {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                link.forwarded.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::SeqCst);
        self.link.healed.notify_all();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self
            .link
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_link_holds_bytes_and_delivers_them_after_healing() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        });
        let p = LinkProxy::start(addr);
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        // The proxy accepts on a polling thread: cut only once it holds the connection, or the
        // bytes below wait in the listen backlog instead of the proxy (and are never "held").
        let t0 = std::time::Instant::now();
        while p.connections() == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the proxy never accepted"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        p.cut();
        c.write_all(b"hello").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = [0u8; 5];
        assert!(c.read_exact(&mut got).is_err(), "a cut link forwarded");
        assert_eq!(p.forwarded(), 0);
        p.heal();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(p.held(), 5, "the bytes sent during the cut arrive late");
        echo.join().unwrap();
    }
}
