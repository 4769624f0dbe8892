//! Pod traffic without any tool in the pod: a TCP exchange between two namespaces, each end
//! on a dedicated thread that enters its namespace and ends with it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

fn in_ns<T: Send + 'static>(
    ns: File,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        work()
    })
}

/// Connects from `client_ns` to `server_ip` (listening in `server_ns`), exchanges a message,
/// and returns the client address the server saw; `Err` if no connection was made.
pub fn tcp_exchange(server_ns: File, server_ip: IpAddr, client_ns: File) -> Result<IpAddr, String> {
    exchange(server_ns, SocketAddr::new(server_ip, 0), client_ns, None)
}

/// Listens on `bind` in `server_ns` (port 0: any), connects from `client_ns` to `target`
/// (`None`: the listening address itself, e.g. `Some(vip:80)` for a Service), exchanges a
/// message and returns the source address the server saw.
pub fn exchange(
    server_ns: File,
    bind: SocketAddr,
    client_ns: File,
    target: Option<SocketAddr>,
) -> Result<IpAddr, String> {
    exchange_within(server_ns, bind, client_ns, target, Duration::from_secs(3))
}

/// [`exchange`] where a connection not made within `timeout` counts as not made: for traffic a
/// firewall drops silently (a policy's deny), where only a timeout can tell.
pub fn exchange_within(
    server_ns: File,
    bind: SocketAddr,
    client_ns: File,
    target: Option<SocketAddr>,
    timeout: Duration,
) -> Result<IpAddr, String> {
    let (tx, rx) = mpsc::channel();
    let server = in_ns(server_ns, move || -> Result<IpAddr, String> {
        let listener = TcpListener::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
        tx.send(listener.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        // Bounded, so a refused or dropped connection ends this thread too.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).ok();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
        stream.write_all(b"pong").map_err(|e| e.to_string())?;
        Ok(peer.ip())
    });
    let Ok(listening) = rx.recv() else {
        return match server.join() {
            Ok(Err(e)) => Err(e),
            _ => Err("server did not start".to_string()),
        };
    };
    let addr = target.unwrap_or(listening);
    let client = in_ns(client_ns, move || -> Result<(), String> {
        let mut stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).ok();
        stream.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
        if &buf != b"pong" {
            return Err("bad reply".into());
        }
        Ok(())
    });
    let client_result = client.join().map_err(|_| "client panicked".to_string())?;
    let seen = server.join().map_err(|_| "server panicked".to_string())?;
    client_result?;
    seen
}

/// Servers listen on each `(namespace, address)` while the client connects `tries` times to
/// `target`; returns how many connections each server accepted (a failed connect counts for
/// none), e.g. to see a Service spread over its endpoints.
pub fn spread(
    servers: Vec<(File, SocketAddr)>,
    client_ns: File,
    target: SocketAddr,
    tries: usize,
) -> Vec<usize> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = servers
        .into_iter()
        .map(|(ns, bind)| {
            let (done, tx) = (done.clone(), tx.clone());
            in_ns(ns, move || -> usize {
                let Ok(listener) = TcpListener::bind(bind) else {
                    let _ = tx.send(());
                    return 0;
                };
                let _ = listener.set_nonblocking(true);
                let _ = tx.send(());
                let mut answered = 0;
                while !done.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
                            let mut buf = [0u8; 4];
                            if stream.read_exact(&mut buf).is_ok() && stream.write_all(b"pong").is_ok() {
                                answered += 1;
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                answered
            })
        })
        .collect();
    drop(tx);
    for _ in 0..handles.len() {
        let _ = rx.recv();
    }
    let client = in_ns(client_ns, move || {
        for _ in 0..tries {
            if let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let mut buf = [0u8; 4];
                let _ = stream.write_all(b"ping").and_then(|_| stream.read_exact(&mut buf));
            }
        }
    });
    let _ = client.join();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
}
