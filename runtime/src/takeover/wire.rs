//! The takeover socket's messages and their framing: a little-endian `u32`
//! length, then the message as JSON; the descriptors a message carries ride
//! on its first bytes as one SCM_RIGHTS control message (`rustix`, whose
//! ancillary buffers hand back owned descriptors without unsafe code).
//!
//! Descriptors attach to the bytes they were sent with, so the receiver
//! reads a frame's length alone with room for control data, then exactly
//! the rest: it never reads into the next frame, whose descriptors would
//! be lost with a plain read.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The handover format this build speaks. A peer with another refuses.
pub const FORMAT: u32 = 1;

/// A frame longer than this is refused (an exported session is a few
/// hundred bytes; the largest message is a session's).
pub const MAX_FRAME: usize = 1 << 20;

/// Descriptors one message may carry (listeners: SQL ones plus the API).
pub const MAX_FDS: usize = 16;

/// One message on the takeover socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Msg {
    /// Both ways, first: who speaks and with what configuration.
    Hello(Hello),
    /// Old to new: the takeover cannot happen, and why.
    Refused {
        /// For the operator.
        reason: String,
    },
    /// Old to new, with the listening sockets (in `names` order): the old
    /// process stopped accepting on them.
    Listeners {
        /// `sql <addr>` or `api <addr>`, one per descriptor.
        names: Vec<String>,
        /// The next connection id the new process gives out (ids never
        /// collide with the sessions it is about to receive).
        next_id: u32,
    },
    /// New to old: the listeners are served here now.
    ListenersTaken,
    /// Old to new, with the client and backend sockets: one idle session.
    Session(SessionMsg),
    /// New to old: the session runs here now; the old forgets it.
    Ack {
        /// Connection id.
        id: u32,
    },
    /// New to old: the session could not be imported; the old keeps it.
    Nack {
        /// Connection id.
        id: u32,
        /// For the operator.
        reason: String,
    },
    /// Old to new: nothing more comes (sessions that could not be handed
    /// over stay with the old process until they end).
    Done {
        /// Sessions kept by the old process.
        kept: u32,
    },
}

/// The hello both sides send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`FORMAT`].
    pub format: u32,
    /// The binary's version (for the log, and the test's proof).
    pub version: String,
    /// The SQL listeners' configured addresses.
    pub sql: Vec<String>,
    /// The API listener's configured address.
    pub api: String,
    /// What the configuration implies for backends: discovery and TLS.
    pub backends: String,
}

/// One idle session, as handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMsg {
    /// Connection id (the client's `CONNECTION_ID()` stays the backend's;
    /// this is the proxy's own).
    pub id: u32,
    /// The client's address (PROXY header source when one was given).
    pub client: String,
    /// The backend's address as the router knows it.
    pub backend: String,
    /// [`tiproxy_core::session::Session::export`]'s bytes.
    pub state: Vec<u8>,
    /// Crash protection's state copy, when the session holds a clean one.
    /// Optional both ways, so it needs no new [`FORMAT`]: a peer without
    /// it ignores it, and a session that comes without one exports its
    /// state once more in the new process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect: Option<ProtectMsg>,
}

/// A session's protection copy on the takeover socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectMsg {
    /// `SHOW SESSION_STATES`' state JSON.
    pub states: String,
    /// Its session token.
    pub token: String,
    /// Its age when sent, in milliseconds.
    pub age_ms: u64,
}

/// Why a frame could not be read.
fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Sends `msg` with `fds` attached. Takes `&UnixStream`, as [`recv`]
/// does, so one task may read while another writes.
pub async fn send(s: &UnixStream, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| bad(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    let mut sent = 0;
    while sent < frame.len() {
        // The descriptors go with the first bytes only.
        let with = if sent == 0 { fds } else { &[] };
        sent += s
            .async_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !with.is_empty() && !control.push(SendAncillaryMessage::ScmRights(with)) {
                    return Err(bad("too many descriptors for one takeover message"));
                }
                sendmsg(
                    s,
                    &[IoSlice::new(&frame[sent..])],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?;
    }
    Ok(())
}

/// Reads into `buf` once, collecting descriptors; 0 at the end.
async fn read_some(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    s.async_io(Interest::READABLE, || {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(buf)];
        let m =
            recvmsg(s, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC).map_err(io::Error::from)?;
        for c in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rs) = c {
                fds.extend(rs);
            }
        }
        if m.flags.contains(ReturnFlags::CTRUNC) {
            return Err(bad("too many descriptors in one takeover message"));
        }
        Ok(m.bytes)
    })
    .await
}

/// Receives one message and the descriptors it carried; `None` at the
/// end of the stream between frames. Not cancel-safe: one task reads.
pub async fn recv(s: &UnixStream) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = read_some(s, &mut len[got..], &mut fds).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(bad(format!(
            "takeover message of {len} bytes (limit {MAX_FRAME})"
        )));
    }
    let mut body = vec![0; len];
    let mut got = 0;
    while got < len {
        // Exactly the rest: never into the next frame's descriptors.
        let n = read_some(s, &mut body[got..], &mut fds).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let msg = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("unreadable takeover message: {e}")))?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn descriptors_travel_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut p, q) = std::os::unix::net::UnixStream::pair().unwrap();
        let msg = Msg::Ack { id: 7 };
        send(&a, &msg, &[std::os::fd::AsFd::as_fd(&q)])
            .await
            .unwrap();
        send(&a, &Msg::ListenersTaken, &[]).await.unwrap();
        drop(q);
        let (got, fds) = recv(&b).await.unwrap().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        let mut q2 = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        q2.write_all(b"hi").unwrap();
        let mut buf = [0; 2];
        p.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let (got, fds) = recv(&b).await.unwrap().unwrap();
        assert_eq!(got, Msg::ListenersTaken);
        assert!(fds.is_empty());
        drop(a);
        assert!(recv(&b).await.unwrap().is_none());
    }

    /// The protection copy is optional both ways: a session message from a
    /// peer without it reads as one without a copy, and a peer that does
    /// not know the field reads past it.
    #[test]
    fn the_protection_copy_is_optional_both_ways() {
        let old =
            r#"{"kind":"session","id":3,"client":"127.0.0.1:5","backend":"b:4000","state":[1,2]}"#;
        let Msg::Session(m) = serde_json::from_str::<Msg>(old).unwrap() else {
            panic!("not a session")
        };
        assert_eq!(m.protect, None);
        let with = Msg::Session(SessionMsg {
            protect: Some(ProtectMsg {
                states: "{}".into(),
                token: "{\"t\":1}".into(),
                age_ms: 1200,
            }),
            ..m.clone()
        });
        let text = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<Msg>(&text).unwrap(), with);
        /// The session message as an older build declares it.
        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum OldMsg {
            Session { id: u32, state: Vec<u8> },
        }
        let OldMsg::Session { id, state } = serde_json::from_str(&text).unwrap();
        assert_eq!((id, state), (3, vec![1, 2]));
        assert_eq!(
            serde_json::to_string(&Msg::Session(m)).unwrap(),
            old,
            "no copy, no field"
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
        let e = recv(&b).await.unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
