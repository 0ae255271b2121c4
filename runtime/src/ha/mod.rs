//! Virtual IP failover between proxies (`[ha]`, TiProxy v1.2): the proxies
//! elect an owner through PD's etcd, and the owner holds the virtual IP on
//! its interface and announces it with gratuitous ARP.
//!
//! The election is etcd's own recipe with TiProxy's key layout: each
//! proxy puts `/tiproxy/vip/<address>/owner/<lease id in hex>` = its
//! advertise address under a lease of [`SESSION_TTL`] seconds, and the key
//! created first is the owner. It goes through the PD seam
//! ([`crate::pd::PdConnector`]), so a PD double can drive it.
//!
//! Two proxies must never hold the address at once (upstream devices
//! remember one MAC for it): the owner gives it up when its lease is lost,
//! when PD has been silent for longer than the lease allows ([`fence`]),
//! and on shutdown before resigning. A new owner takes it only once the old
//! owner's key is gone.

mod fence;
mod link;

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout_at};
use tracing::{debug, info, warn};

pub use fence::Fence;
pub use link::{Link, LinkError};

use crate::config::VirtualIp;
use crate::discovery::ClusterTls;
use crate::pd::{PdClient, PdConnector, PdWatch};

/// The lease TTL asked for, seconds: it bounds failover time after a
/// crash. TiProxy asks for 3; 2 (etcd's smallest with its default timing)
/// lets a killed owner be replaced within 3 s. PD's etcd raises it to its
/// own minimum (5 s with PD's default election interval); the fence
/// follows the TTL PD answers.
pub const SESSION_TTL: i64 = 2;
/// How long one PD call may take before PD counts as unreachable.
const PD_CALL: Duration = Duration::from_secs(1);
/// Pause before reconnecting to PD.
const RETRY: Duration = Duration::from_millis(500);
/// TiProxy's `garpRefreshInterval`.
const GARP_REFRESH: Duration = Duration::from_secs(1);

/// The election key prefix for `vip` (TiProxy's `/tiproxy/vip/%s/owner`).
pub fn election_prefix(vip: Ipv4Addr) -> String {
    format!("/tiproxy/vip/{vip}/owner")
}

/// The `type` label of `tiproxy_server_owner` for `vip`: the key without
/// `/tiproxy/` and `/owner`, as TiProxy trims it.
pub fn owner_label(vip: Ipv4Addr) -> String {
    format!("vip/{vip}")
}

/// The virtual IP as the API shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HaStatus {
    /// `virtual-ip` as configured.
    pub virtual_ip: String,
    /// The owner's advertise address, as this proxy last read it from PD.
    pub owner: Option<String>,
    /// Whether this proxy holds the address now.
    pub holding: bool,
    /// Why PD or the interface cannot be used, while that lasts.
    pub error: Option<String>,
}

/// Shared with the API; `None` when `[ha]` is off.
pub type StatusCell = Arc<Mutex<Option<HaStatus>>>;

/// Where the virtual IP is put: the interface ([`Link`]), or a double.
pub trait Address: Send + 'static {
    /// Adds the address (no-op when present).
    fn add(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Removes the address (no-op when absent).
    fn remove(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Sends one burst of gratuitous ARP.
    fn announce(&mut self) -> Result<(), String>;
}

impl Address for Link {
    async fn add(&mut self) -> Result<(), String> {
        Link::add(self).await.map_err(|e| e.to_string())
    }
    async fn remove(&mut self) -> Result<(), String> {
        Link::remove(self).await.map_err(|e| e.to_string())
    }
    fn announce(&mut self) -> Result<(), String> {
        Link::announce(self).map_err(|e| e.to_string())
    }
}

/// Asks the election task to resign and waits until it has.
#[derive(Debug)]
pub struct Resign {
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

impl Resign {
    /// Removes the address, then revokes the lease so another proxy takes
    /// over at once (TiProxy's `PreClose`). Bounded by the lease's TTL.
    pub async fn resign(mut self) {
        let _ = self.stop.send(true);
        let wait = Duration::from_secs(SESSION_TTL as u64 + 1);
        let _ = tokio::time::timeout(wait, self.done.wait_for(|d| *d)).await;
    }
}

/// What the election task needs besides PD.
#[derive(Debug)]
pub struct Election<A> {
    /// This proxy's id in the election: its advertise address.
    pub id: String,
    /// The address to manage.
    pub vip: VirtualIp,
    /// Where it goes.
    pub address: A,
    /// Shown by the API.
    pub status: StatusCell,
}

/// A resign handle and the receiving ends it drives.
pub fn resign_pair() -> (Resign, watch::Receiver<bool>, watch::Sender<bool>) {
    let (stop, stop_rx) = watch::channel(false);
    let (done_tx, done) = watch::channel(false);
    (Resign { stop, done }, stop_rx, done_tx)
}

/// The owner side of the election: the address, the fence, the status.
struct Owner<A> {
    id: String,
    vip: VirtualIp,
    address: A,
    status: StatusCell,
    label: String,
    fence: Fence,
    holding: bool,
    /// Follow-up GARP bursts still to send, and when the next is due.
    refresh: Option<(u32, Instant)>,
    /// Whether a problem was logged and not yet followed by recovery: a
    /// lasting outage is logged once, with a count when it ends.
    logged: bool,
    /// Problems since the last logged one.
    repeats: u64,
    /// A problem was met in this round of the loop.
    troubled: bool,
}

impl<A: Address> Owner<A> {
    fn show(&self, f: impl FnOnce(&mut HaStatus)) {
        let mut s = self.status.lock().expect("ha status lock");
        if let Some(s) = s.as_mut() {
            f(s);
        }
    }

    fn problem(&mut self, what: &str, e: String) {
        let text = format!("{what}: {e}");
        self.troubled = true;
        if self.logged {
            self.repeats += 1;
            debug!(vip = %self.vip.addr, "{text}");
        } else {
            warn!(vip = %self.vip.addr, "{text} (retrying)");
            self.logged = true;
        }
        self.show(|s| s.error = Some(text));
    }

    /// A round of the loop met no problem.
    fn recovered(&mut self) {
        if self.troubled {
            return;
        }
        if self.logged {
            info!(vip = %self.vip.addr, problems = self.repeats + 1, "virtual IP election works again");
            self.logged = false;
            self.repeats = 0;
        }
        self.show(|s| s.error = None);
    }

    async fn hold(&mut self) {
        if self.holding {
            return;
        }
        if let Err(e) = self.address.add().await {
            self.problem("cannot add the virtual IP", e);
            return;
        }
        self.holding = true;
        info!(vip = %self.vip.addr, interface = %self.vip.interface, "elected: holding the virtual IP");
        crate::metrics::metrics()
            .owner
            .with_label_values(&[&self.label])
            .set(1);
        self.show(|s| s.holding = true);
        if let Err(e) = self.address.announce() {
            // The address is ours; the refreshes retry the announcement.
            self.problem("cannot announce the virtual IP", e);
        }
        self.refresh = (self.vip.garp_refresh > 0)
            .then(|| (self.vip.garp_refresh, Instant::now() + GARP_REFRESH));
    }

    /// Gives the address up (also when this proxy does not think it holds
    /// it: a killed predecessor may have left it on the interface).
    async fn release(&mut self, why: &str) {
        self.refresh = None;
        if let Err(e) = self.address.remove().await {
            self.problem("cannot remove the virtual IP", e);
            return;
        }
        if self.holding {
            info!(vip = %self.vip.addr, "released the virtual IP: {why}");
            self.holding = false;
            let _ = crate::metrics::metrics()
                .owner
                .remove_label_values(&[&self.label]);
            self.show(|s| s.holding = false);
        }
    }

    /// Releases the address once the fence no longer allows holding it.
    async fn enforce(&mut self) {
        if self.holding && !self.fence.may_hold(Instant::now()) {
            self.release("PD has not renewed the lease in time").await;
        }
    }

    /// When a PD call must give up: its own limit, or earlier when the
    /// fence ends first while holding.
    fn call_deadline(&self) -> Instant {
        let limit = Instant::now() + PD_CALL;
        match self.fence.poll_deadline() {
            Some(f) if self.holding => limit.min(f),
            _ => limit,
        }
    }

    /// Sends a due GARP refresh.
    fn refresh_garp(&mut self) {
        if let Some((left, at)) = self.refresh
            && at <= Instant::now()
        {
            if let Err(e) = self.address.announce() {
                self.problem("cannot refresh the virtual IP's announcement", e);
            }
            self.refresh = (left > 1).then(|| (left - 1, at + GARP_REFRESH));
        }
    }

    /// Sleeps until `until`, the fence's end or the next GARP refresh,
    /// whichever is first, or until `stop`.
    async fn wait(&mut self, until: Instant, stop: &mut watch::Receiver<bool>) {
        let mut t = until;
        if self.holding {
            if let Some(f) = self.fence.poll_deadline() {
                t = t.min(f);
            }
            if let Some((_, r)) = self.refresh {
                t = t.min(r);
            }
        }
        if !stopping(stop) {
            tokio::select! {
                _ = sleep_until(t) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        self.enforce().await;
        self.refresh_garp();
    }
}

/// Whether the election must end: asked to, or its [`Resign`] is gone.
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Runs the election for `e.vip` until `stop` says true, then releases the
/// address, revokes the lease and sets `done`.
pub async fn run<P: PdConnector, A: Address>(
    connector: P,
    pd: Vec<String>,
    tls: ClusterTls,
    e: Election<A>,
    mut stop: watch::Receiver<bool>,
    done: watch::Sender<bool>,
) {
    let label = owner_label(e.vip.addr);
    let prefix = election_prefix(e.vip.addr);
    *e.status.lock().expect("ha status lock") = Some(HaStatus {
        virtual_ip: format!("{}/{}", e.vip.addr, e.vip.prefix),
        ..HaStatus::default()
    });
    let mut o = Owner {
        id: e.id,
        vip: e.vip,
        address: e.address,
        status: e.status,
        label,
        fence: Fence::default(),
        holding: false,
        refresh: None,
        logged: false,
        repeats: 0,
        troubled: false,
    };
    // A previous run of this proxy may have been killed holding it.
    o.release("starting").await;
    // The lease and key of this proxy's candidacy; kept across reconnects
    // so a short PD outage does not send it to the back of the queue.
    let mut session: Option<(i64, String)> = None;
    let mut client: Option<P::Client> = None;
    'connect: while !stopping(&stop) {
        if client.is_none() {
            let deadline = o.call_deadline();
            match timeout_at(deadline, connector.connect(&pd, tls.get())).await {
                Ok(Ok(c)) => client = Some(c),
                Ok(Err(err)) => o.problem("cannot reach PD", err),
                Err(_) => o.problem("cannot reach PD", "timed out".into()),
            }
        }
        let Some(c) = client.as_mut() else {
            o.wait(Instant::now() + RETRY, &mut stop).await;
            continue;
        };
        let (lease, key, mut watch) =
            match campaign(c, &prefix, &o.id, &mut session, o.call_deadline()).await {
                Ok(x) => x,
                Err(err) => {
                    o.problem("cannot campaign in PD", err);
                    client = None;
                    o.wait(Instant::now() + RETRY, &mut stop).await;
                    continue;
                }
            };
        loop {
            if stopping(&stop) {
                break 'connect;
            }
            o.troubled = false;
            let sent = Instant::now();
            match timeout_at(o.call_deadline(), c.keep_alive(lease)).await {
                Ok(Ok(ttl)) if ttl > 0 => o.fence.handle_renewed(sent, ttl),
                Ok(Ok(_)) => {
                    o.fence.handle_lost();
                    o.release("the lease expired").await;
                    o.problem("the election lease expired", "campaigning again".into());
                    session = None;
                    continue 'connect;
                }
                Ok(Err(err)) => {
                    o.problem("cannot renew the election lease", err);
                    o.enforce().await;
                    client = None;
                    o.wait(Instant::now() + RETRY, &mut stop).await;
                    continue 'connect;
                }
                Err(_) => {
                    o.problem("cannot renew the election lease", "timed out".into());
                    o.enforce().await;
                    client = None;
                    continue 'connect;
                }
            }
            match timeout_at(o.call_deadline(), c.first_created(&prefix)).await {
                Ok(Ok(Some((k, v)))) => {
                    let owner = String::from_utf8_lossy(&v).into_owned();
                    o.show(|s| s.owner = Some(owner));
                    if k == key && o.fence.may_hold(Instant::now()) {
                        o.hold().await;
                    } else if o.holding {
                        o.release("another proxy is the owner").await;
                    }
                    o.recovered();
                }
                Ok(Ok(None)) => {
                    // Our own key is gone although the lease lives.
                    o.release("the election key disappeared").await;
                    session = None;
                    continue 'connect;
                }
                Ok(Err(err)) => {
                    o.problem("cannot read the owner", err);
                    client = None;
                    continue 'connect;
                }
                Err(_) => {
                    o.problem("cannot read the owner", "timed out".into());
                    client = None;
                    continue 'connect;
                }
            }
            // Renew at a quarter of the TTL, so one late answer does not
            // end the fence; a change under the prefix (an owner leaving)
            // wakes a candidate at once.
            let next = Instant::now() + Duration::from_secs(SESSION_TTL as u64) / 4;
            loop {
                tokio::select! {
                    news = watch.next() => {
                        if news.is_err() {
                            client = None;
                            continue 'connect;
                        }
                        break;
                    }
                    _ = o.wait(next, &mut stop) => {
                        if Instant::now() >= next || stopping(&stop) || !o.holding {
                            break;
                        }
                    }
                }
            }
        }
    }
    // Resign: the address first, so no instant has two holders.
    o.release("shutting down").await;
    if let (Some(c), Some((lease, _))) = (client.as_mut(), session) {
        let until = Instant::now() + PD_CALL;
        match timeout_at(until, c.revoke_lease(lease)).await {
            Ok(Ok(())) => info!("resigned the virtual IP election"),
            Ok(Err(e)) => warn!(
                "cannot resign the virtual IP election (another proxy takes over when the lease expires): {e}"
            ),
            Err(_) => warn!(
                "cannot resign the virtual IP election in time (another proxy takes over when the lease expires)"
            ),
        }
    }
    let _ = done.send(true);
}

/// Puts this proxy's candidacy (a new lease, or `session` kept from
/// before, which a failure after the put keeps) and watches the prefix.
async fn campaign<C: PdClient>(
    c: &mut C,
    prefix: &str,
    id: &str,
    session: &mut Option<(i64, String)>,
    deadline: Instant,
) -> Result<(i64, String, C::Watch), String> {
    let steps = async {
        let (lease, key) = match session.clone() {
            Some(s) => s,
            None => {
                let lease = c.grant_lease(SESSION_TTL).await?;
                let key = format!("{prefix}/{lease:x}");
                c.put(&key, id.to_string(), lease).await?;
                *session = Some((lease, key.clone()));
                (lease, key)
            }
        };
        let listing = c.get_prefix(prefix).await?;
        let watch = c.watch_prefix(prefix, listing.revision + 1).await?;
        Ok((lease, key, watch))
    };
    timeout_at(deadline, steps)
        .await
        .map_err(|_| "timed out".to_string())?
}
