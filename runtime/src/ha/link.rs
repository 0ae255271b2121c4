//! The virtual IP on the wire: adding and removing the address on the
//! interface (rtnetlink, like `ip addr add/del`) and announcing it with
//! gratuitous ARP (an `AF_PACKET` channel, like `arping -U`). Linux only;
//! needs CAP_NET_ADMIN and CAP_NET_RAW.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{AddressMessageBuilder, Handle};

use crate::config::VirtualIp;

const ETH_P_ARP: u16 = 0x0806;

/// The interface and the address on it.
#[allow(missing_debug_implementations)] // rtnetlink's handle has no Debug
pub struct Link {
    handle: Handle,
    /// The connection task rtnetlink answers through.
    conn: tokio::task::JoinHandle<()>,
    vip: VirtualIp,
    index: u32,
    mac: [u8; 6],
}

impl Drop for Link {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Why the address could not be handled: says what to check.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(io::Error),
    /// `[ha] interface` names no interface here.
    #[error("[ha] interface \"{0}\" does not exist")]
    NoInterface(String),
    /// The kernel refused a request (often: CAP_NET_ADMIN missing).
    #[error("{what} {addr}/{prefix} on {interface}: {source} (tiproxy needs CAP_NET_ADMIN)")]
    Netlink {
        /// The operation.
        what: &'static str,
        /// The address.
        addr: Ipv4Addr,
        /// Its prefix.
        prefix: u8,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// Reading the interface failed.
    #[error("reading interface {0}: {1}")]
    Read(String, rtnetlink::Error),
    /// Sending gratuitous ARP failed (often: CAP_NET_RAW missing).
    #[error("gratuitous ARP for {0} on {1}: {2} (tiproxy needs CAP_NET_RAW)")]
    Arp(Ipv4Addr, String, io::Error),
}

impl Link {
    /// Finds `vip.interface` and its hardware address.
    pub async fn open(vip: &VirtualIp) -> Result<Self, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        let conn = crate::task::spawn(conn);
        let mut links = handle
            .link()
            .get()
            .match_name(vip.interface.clone())
            .execute();
        let link = match links.try_next().await {
            Ok(Some(l)) => l,
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => {
                conn.abort();
                return Err(LinkError::NoInterface(vip.interface.clone()));
            }
            Err(e) => {
                conn.abort();
                return Err(LinkError::Read(vip.interface.clone(), e));
            }
        };
        let mut mac = [0u8; 6];
        for a in &link.attributes {
            if let LinkAttribute::Address(bytes) = a
                && bytes.len() == 6
            {
                mac.copy_from_slice(bytes);
            }
        }
        Ok(Self {
            handle,
            conn,
            vip: vip.clone(),
            index: link.header.index,
            mac,
        })
    }

    /// Whether the interface has the address now.
    pub async fn has(&self) -> Result<bool, LinkError> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        while let Some(m) = addrs
            .try_next()
            .await
            .map_err(|e| LinkError::Read(self.vip.interface.clone(), e))?
        {
            let ours = m.header.prefix_len == self.vip.prefix
                && m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Local(IpAddr::V4(ip))
                        | AddressAttribute::Address(IpAddr::V4(ip)) if *ip == self.vip.addr)
                });
            if ours {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds the address (`ip addr add`), unless it is there.
    pub async fn add(&self) -> Result<(), LinkError> {
        if self.has().await? {
            return Ok(());
        }
        self.handle
            .address()
            .add(self.index, IpAddr::V4(self.vip.addr), self.vip.prefix)
            .execute()
            .await
            .map_err(|e| self.netlink_error("adding", e))
    }

    /// Removes the address (`ip addr del`), if it is there.
    pub async fn remove(&self) -> Result<(), LinkError> {
        if !self.has().await? {
            return Ok(());
        }
        let msg = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(self.index)
            .address(self.vip.addr, self.vip.prefix)
            .build();
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| self.netlink_error("removing", e))
    }

    fn netlink_error(&self, what: &'static str, source: rtnetlink::Error) -> LinkError {
        LinkError::Netlink {
            what,
            addr: self.vip.addr,
            prefix: self.vip.prefix,
            interface: self.vip.interface.clone(),
            source,
        }
    }

    /// Sends one burst of `garp-burst-count` gratuitous ARP requests, so
    /// neighbours replace their cached MAC for the address with ours.
    pub fn announce(&self) -> Result<(), LinkError> {
        let fail = |e| LinkError::Arp(self.vip.addr, self.vip.interface.clone(), e);
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.index == self.index)
            .ok_or_else(|| fail(io::Error::other("the interface is gone")))?;
        let config = pnet_datalink::Config {
            read_timeout: Some(std::time::Duration::from_millis(1)),
            ..Default::default()
        };
        let mut tx = match pnet_datalink::channel(&iface, config).map_err(fail)? {
            pnet_datalink::Channel::Ethernet(tx, _) => tx,
            _ => return Err(fail(io::Error::other("not an Ethernet interface"))),
        };
        let frame = gratuitous_arp(self.mac, self.vip.addr);
        for _ in 0..self.vip.garp_burst {
            match tx.send_to(&frame, None) {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(fail(e)),
                None => return Err(fail(io::Error::other("the channel cannot send"))),
            }
        }
        Ok(())
    }
}

/// A broadcast Ethernet frame carrying a gratuitous ARP request (RFC 5227
/// "ARP announcement"): sender and target protocol address are both the
/// announced address.
fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let p = &mut f[14..];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // Target hardware address stays zero, as in `arping -U`.
    p[24..28].copy_from_slice(&ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_names_our_mac_and_the_address_twice() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(
            &f[..14],
            &[255, 255, 255, 255, 255, 255, 2, 0, 0, 0, 0, 9, 8, 6]
        );
        let p = &f[14..];
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&p[14..18], &[10, 1, 2, 3]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[10, 1, 2, 3]);
    }
}
