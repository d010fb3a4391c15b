//! A DNS stand-in: answers every A query for any name with one fixed
//! address (and AAAA or any other type with no answer), over UDP and TCP on
//! the same address, enough for `dig` and glibc's resolver (`getent`).
//! The answer tells which server answered: the proxy's DNS listener or a
//! "real" nameserver. Follows RFC 1035 §4 (header, question, answer RR;
//! TCP messages prefixed by their two-byte length).
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::Server;

/// The answer to one query message, or None if it is not a query this
/// stand-in can parse (a real server would answer FORMERR; dropping it
/// makes the client time out, which a test notices as well).
pub fn answer(query: &[u8], a: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then QTYPE and QCLASS.
    let mut i = 12;
    loop {
        let len = usize::from(*query.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question = query.get(12..i + 4)?;
    let is_a = qtype == 1;
    let mut out = Vec::with_capacity(question.len() + 32);
    out.extend_from_slice(&query[0..2]);
    // QR, the query's RD, RA; NOERROR.
    out.push(0x80 | (query[2] & 0x01));
    out.push(0x80);
    out.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if is_a {
        // The question's name (pointer to offset 12), A, IN, TTL 60.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&a.octets());
    }
    Some(out)
}

impl Server {
    /// A DNS server on `addr` (UDP and TCP) inside `netns`, answering
    /// every A query with `a`.
    pub fn dns(netns: &Path, addr: SocketAddr, a: Ipv4Addr) -> Result<(Server, Server)> {
        let udp = Server::start(netns, move || {
            let u = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            u.set_nonblocking(true)?;
            Ok(Box::new(move || {
                let mut buf = [0u8; 1500];
                match u.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        if let Some(reply) = answer(&buf[..n], a) {
                            let _ = u.send_to(&reply, from);
                        }
                        true
                    }
                    Err(_) => false,
                }
            }))
        })?;
        let tcp = Server::start(netns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(Box::new(move || match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    // Every query of the connection, until the client closes.
                    loop {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).is_err() {
                            break;
                        }
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if s.read_exact(&mut q).is_err() {
                            break;
                        }
                        let Some(reply) = answer(&q, a) else { break };
                        let mut msg = (reply.len() as u16).to_be_bytes().to_vec();
                        msg.extend_from_slice(&reply);
                        if s.write_all(&msg).is_err() {
                            break;
                        }
                    }
                    true
                }
                Err(_) => false,
            }))
        })?;
        Ok((udp, tcp))
    }
}

/// How a client sends its query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// An unconnected UDP socket (`sendto`/`recvfrom`, as musl does).
    Udp,
    /// A connected UDP socket (`connect`, then `send`/`recvfrom`, as glibc).
    UdpConnected,
    Tcp,
}

/// What a query got back: the A record, and where the reply came from as
/// the application sees it (`recvfrom`'s address for UDP, `getpeername`
/// for connected sockets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub a: Ipv4Addr,
    pub from: SocketAddr,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "A {} from {}", self.a, self.from)
    }
}

/// Asks `server` for `example.test A` from inside `netns` as `uid`.
pub fn query(netns: &Path, uid: u32, server: SocketAddr, via: Via) -> Result<Reply> {
    crate::in_netns_as(netns, uid, move || -> Result<Reply> {
        let timeout = Some(Duration::from_secs(3));
        let (bytes, from) = match via {
            Via::Udp | Via::UdpConnected => {
                let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
                let u = UdpSocket::bind(bind)?;
                u.set_read_timeout(timeout)?;
                if via == Via::UdpConnected {
                    u.connect(server)?;
                    u.send(&example_query())?;
                } else {
                    u.send_to(&example_query(), server)?;
                }
                let mut buf = [0u8; 1500];
                let (n, from) = u.recv_from(&mut buf).context("no reply")?;
                if via == Via::UdpConnected {
                    let peer = u.peer_addr()?;
                    anyhow::ensure!(peer == from, "getpeername {peer}, reply from {from}");
                }
                (buf[..n].to_vec(), from)
            }
            Via::Tcp => {
                let mut s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
                s.set_read_timeout(timeout)?;
                let q = example_query();
                let mut msg = (q.len() as u16).to_be_bytes().to_vec();
                msg.extend_from_slice(&q);
                // Asked before anything can end the connection; only
                // needed (and only an error) if a DNS reply came.
                let peer = s.peer_addr();
                s.write_all(&msg)?;
                // Read until the peer is done, however it ends the
                // connection: a listener that is no DNS server (the
                // outbound proxy) closes with the query unread, and
                // whether the reader then sees EOF or ECONNRESET is a
                // race between its reads and the RST. What it sent is not.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    if got.len() >= 2 && got.len() >= 2 + usize::from(u16::from_be_bytes([got[0], got[1]])) {
                        break;
                    }
                }
                let want = if got.len() >= 2 { 2 + usize::from(u16::from_be_bytes([got[0], got[1]])) } else { 2 };
                anyhow::ensure!(
                    got.len() >= want,
                    "no DNS reply over TCP; the peer sent {:?}",
                    String::from_utf8_lossy(&got).trim()
                );
                (got[2..want].to_vec(), peer?)
            }
        };
        anyhow::ensure!(bytes.len() >= 16 && bytes[6..8] == [0, 1], "no answer in {bytes:?}");
        let n = bytes.len();
        Ok(Reply { a: Ipv4Addr::new(bytes[n - 4], bytes[n - 3], bytes[n - 2], bytes[n - 1]), from })
    })?
}

/// istio-iptables' outbound rules with DNS capture (`--redirect-dns`,
/// REDIRECT mode, no inbound capture) for proxy UID/GID `proxy` and one
/// nameserver, as one shell line: the nat lines of its `dns-uid-gid`
/// golden (the owner RETURNs, `ISTIO_OUTPUT_DNS` for TCP and UDP), then
/// its localhost RETURN and the outbound REDIRECT to 15001.
pub fn istio_dns_rules(nameserver: &str, proxy: u32) -> String {
    [
        "-N ISTIO_OUTPUT".to_string(),
        "-N ISTIO_OUTPUT_DNS".into(),
        "-A OUTPUT -j ISTIO_OUTPUT".into(),
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".into(),
        format!("-A ISTIO_OUTPUT -m owner --uid-owner {proxy} -j RETURN"),
        format!("-A ISTIO_OUTPUT -m owner --gid-owner {proxy} -j RETURN"),
        "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS".into(),
        format!("-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d {nameserver}/32 -j REDIRECT --to-ports 15053"),
        format!("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d {nameserver}/32 -j REDIRECT --to-port 15053"),
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into(),
        "-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001".into(),
    ]
    .iter()
    .map(|r| format!("iptables -t nat {r}"))
    .collect::<Vec<_>>()
    .join(" && ")
}

/// `example.test A`, recursion desired.
pub fn example_query() -> Vec<u8> {
    let mut q = vec![0x51, 0x7e, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dig example.test A` without EDNS, as bytes.
    const QUERY: [u8; 30] = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 4, b't', b'e',
        b's', b't', 0, 0, 1, 0, 1,
    ];

    #[test]
    fn answers_a_queries_and_nothing_else() {
        let r = answer(&QUERY, Ipv4Addr::new(192, 0, 2, 53)).unwrap();
        assert_eq!(&r[0..2], &[0x12, 0x34], "the query's id");
        assert_eq!(r[2] & 0x80, 0x80, "a response");
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 53]);
        let mut aaaa = QUERY;
        aaaa[27] = 28;
        let r = answer(&aaaa, Ipv4Addr::new(192, 0, 2, 53)).unwrap();
        assert_eq!(&r[6..8], &[0, 0], "no answer for AAAA");
        let mut response = QUERY;
        response[2] |= 0x80;
        assert!(answer(&response, Ipv4Addr::LOCALHOST).is_none());
        assert!(answer(&QUERY[..20], Ipv4Addr::LOCALHOST).is_none());
    }
}
