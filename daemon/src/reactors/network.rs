//! The Network object's host side: executes the pure plan of `objects::network_plan` through
//! netlink, runs dnsmasq on the primary, keeps the per-network nft chains in step, and
//! reports status and DHCP leases back to etcd.
//!
//! An invalid spec (bad field, overlap with another network, a name taken on this host)
//! becomes that network's error status and changes nothing on the host for it. Its warning
//! is logged once per distinct error (the resync tick sees it again every interval), and
//! "network valid again" once when it is fixed. Its dnsmasq keeps serving as it was (one left
//! by a previous daemon is adopted), and stops with the daemon like every other: no dnsmasq
//! outlives a daemon shutdown. A deleted network, or one no longer served here, gets its
//! dnsmasq stopped even when a previous daemon started it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use debvisor_firewall::{Firewall, FirewallConfig, NetworkRules, Nft, Ruleset};
use debvisor_netconf::{AddrOwner, HostNet, Netlink};
use debvisor_objects::network::{self, Direction, Network, NetworkKind, NetworkType};
use debvisor_objects::network_plan::{self, HostContext, Step};
use debvisor_objects::{Action, Entry, ObjectError, ReconcileError, Reconciler, Store};
use serde_json::json;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use crate::dnsmasq::{self, Instance, Lease};

/// Everything the Network reconciler needs on this node.
pub struct NetworkHost {
    pub node: String,
    pub store: Store,
    pub host: Arc<Netlink>,
    /// Cluster-network facts and the primary flag.
    pub ctx: Mutex<HostContext>,
    /// `Some` when `firewall.enabled`: the base config and the cluster prefixes.
    pub firewall: Option<FirewallSync>,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub dnsmasq_bin: PathBuf,
    dnsmasq: AsyncMutex<BTreeMap<u32, Instance>>,
    /// Valid networks applied on this host (overlap checks and the firewall view).
    applied: Mutex<BTreeMap<u32, Network>>,
    /// Last status written per network (writes only on change).
    status: Mutex<BTreeMap<u32, serde_json::Value>>,
    /// Last leases written per network.
    leases: Mutex<BTreeMap<u32, BTreeMap<String, Lease>>>,
    /// The error last logged per invalid network: the warning is logged once per distinct
    /// error, not on every resync tick.
    invalid: Mutex<BTreeMap<u32, String>>,
    /// Non-numeric network ids already warned about (once each).
    ignored_ids: Mutex<std::collections::BTreeSet<String>>,
    /// False until the first list of networks has been reconciled: before that the ruleset
    /// applied by the firewall stage (built from the whole etcd list) must not be replaced by
    /// one that knows only the networks reconciled so far.
    fw_ready: AtomicBool,
    /// Wakes the firewall worker when the applied networks changed.
    fw_dirty: tokio::sync::Notify,
    /// Networks whose removal is held because the store was found replaced.
    held: Mutex<std::collections::BTreeSet<u32>>,
}

/// The node firewall, rebuilt from the base config plus every applied network.
pub struct FirewallSync {
    pub cfg: FirewallConfig,
    pub cluster: Vec<debvisor_firewall::Cidr>,
    pub nft: Arc<Nft>,
    /// The model last applied (its nft JSON): a different model is an update, the same
    /// model with a different table is drift.
    last: AsyncMutex<Option<String>>,
    /// Times a sync found the table drifted from the model and re-applied it (`/metrics`).
    drift_repairs: Arc<std::sync::atomic::AtomicU64>,
}

impl FirewallSync {
    /// A firewall synchroniser.
    pub fn new(
        cfg: FirewallConfig,
        cluster: Vec<debvisor_firewall::Cidr>,
        nft: Nft,
    ) -> FirewallSync {
        FirewallSync {
            cfg,
            cluster,
            nft: Arc::new(nft),
            last: AsyncMutex::new(None),
            drift_repairs: Arc::default(),
        }
    }

    /// The count of drift repairs (shared; grows with every repair).
    pub fn drift_repairs_handle(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.drift_repairs.clone()
    }

    /// Would nft accept the ruleset with `candidate` added to `others`? `Err` names the ACL
    /// (`acl/<in|out>/<order>`) nft refused and carries nft's own message.
    pub async fn check(
        &self,
        others: Vec<NetworkRules>,
        candidate: NetworkRules,
    ) -> Result<(), ObjectError> {
        let vni = candidate.vni;
        let mut all = others;
        all.push(candidate);
        let ruleset = Ruleset::from_config(&self.cfg, &self.cluster, &all)
            .map_err(|e| ObjectError::new("acl", e.to_string()))?;
        let nft = self.nft.clone();
        let res = tokio::task::spawn_blocking(move || nft.check(&ruleset))
            .await
            .map_err(|e| ObjectError::new("acl", format!("firewall check task: {e}")))?;
        match res {
            Ok(()) => Ok(()),
            Err(debvisor_firewall::FirewallError::Rejected { location, stderr }) => {
                let field = match &location {
                    Some(debvisor_firewall::Location::Rule {
                        chain, description, ..
                    }) => {
                        let dir = chain.strip_prefix(&format!("net{vni}-")).unwrap_or("");
                        let order = description
                            .strip_prefix("acl ")
                            .and_then(|r| r.split(':').next())
                            .unwrap_or("");
                        if dir.is_empty() || order.is_empty() {
                            "acl".to_string()
                        } else {
                            format!("acl/{dir}/{order}")
                        }
                    }
                    _ => "acl".to_string(),
                };
                Err(ObjectError::new(field, format!("nft refused it: {stderr}")))
            }
            // Not this network's fault (nft missing, timeout): let the sync report it.
            Err(_) => Ok(()),
        }
    }

    /// Make our table match config + `networks`; one atomic batch when it differs.
    /// Returns whether anything changed.
    pub async fn sync(&self, networks: Vec<NetworkRules>) -> Result<bool, String> {
        let mut last = self.last.lock().await;
        let ruleset =
            Ruleset::from_config(&self.cfg, &self.cluster, &networks).map_err(|e| e.to_string())?;
        let json = ruleset.to_json().map_err(|e| e.to_string())?;
        let update = last.as_deref() != Some(json.as_str());
        let nft = self.nft.clone();
        let out = tokio::task::spawn_blocking(move || {
            if update {
                nft.apply(&ruleset).map(|()| None)
            } else {
                nft.ensure(&ruleset).map(Some)
            }
        })
        .await
        .map_err(|e| format!("firewall task: {e}"))?
        .map_err(|e| e.to_string())?;
        *last = Some(json);
        match out {
            None => {
                info!(
                    networks = networks.len(),
                    "firewall applied (table inet debvisor)"
                );
                Ok(true)
            }
            Some(o) if o.changed => {
                let drift = o.drift.map(|d| d.to_string()).unwrap_or_default();
                info!(networks = networks.len(), drift = %drift, "firewall re-applied (drift corrected)");
                self.drift_repairs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }
}

/// Per-bridge kernel settings of a client-network bridge: the node never autoconfigures
/// itself from router advertisements on a tenant network.
fn bridge_sysctls(bridge: &str) -> Result<(), ReconcileError> {
    let wanted: BTreeMap<String, String> = [("accept_ra", "0"), ("autoconf", "0")]
        .iter()
        .map(|(k, v)| (format!("net.ipv6.conf.{bridge}.{k}"), v.to_string()))
        .collect();
    match debvisor_netconf::sysctl::apply(std::path::Path::new("/proc/sys"), &wanted) {
        Ok(changes) => {
            for c in changes {
                info!(key = %c.key, before = %c.before, after = %c.after, "bridge sysctl changed");
            }
            Ok(())
        }
        // A kernel without IPv6 has no such keys: nothing to protect against.
        Err(debvisor_netconf::sysctl::SysctlError::Read { .. }) => Ok(()),
        Err(e) => Err(ReconcileError::Host(e.to_string())),
    }
}

/// The firewall view of one network.
pub fn network_rules(net: &Network, primary: bool) -> Result<NetworkRules, ObjectError> {
    let conv = |dir: Direction,
                acls: &[network::Acl]|
     -> Result<Vec<debvisor_firewall::Acl>, ObjectError> {
        acls.iter()
            .map(|a| {
                let field = format!("acl/{dir}/{}", a.order);
                let cidr = |p: &Option<network::Prefix>, which: &str| {
                    p.map(|p| {
                        debvisor_firewall::Cidr::new(p.addr, p.len)
                            .map_err(|e| ObjectError::new(format!("{field}.{which}"), e))
                    })
                    .transpose()
                };
                Ok(debvisor_firewall::Acl {
                    order: a.order,
                    action: a.rule.action,
                    proto: a.rule.proto,
                    source: cidr(&a.source, "source")?,
                    dest: cidr(&a.destination, "destination")?,
                    ports: a
                        .ports
                        .map(|(s, e)| vec![debvisor_firewall::PortRange { start: s, end: e }])
                        .unwrap_or_default(),
                    description: a.rule.description.clone(),
                })
            })
            .collect()
    };
    Ok(NetworkRules {
        vni: net.vni,
        bridge: net.bridge_name(),
        acls_in: conv(Direction::In, &net.acl_in)?,
        acls_out: conv(Direction::Out, &net.acl_out)?,
        default_in: debvisor_firewall::AclAction::Accept,
        default_out: debvisor_firewall::AclAction::Accept,
        dhcp_dns: primary
            && net.kind == NetworkType::Managed
            && net.ipv4.as_ref().and_then(|f| f.gateway).is_some(),
    })
}

impl NetworkHost {
    /// A reconciler host for `node`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        store: Store,
        host: Arc<Netlink>,
        ctx: HostContext,
        firewall: Option<FirewallSync>,
        run_dir: PathBuf,
        state_dir: PathBuf,
        dnsmasq_bin: PathBuf,
    ) -> NetworkHost {
        NetworkHost {
            node,
            store,
            host,
            ctx: Mutex::new(ctx),
            firewall,
            run_dir,
            state_dir,
            dnsmasq_bin,
            dnsmasq: AsyncMutex::new(BTreeMap::new()),
            applied: Mutex::new(BTreeMap::new()),
            status: Mutex::new(BTreeMap::new()),
            leases: Mutex::new(BTreeMap::new()),
            invalid: Mutex::new(BTreeMap::new()),
            ignored_ids: Mutex::new(std::collections::BTreeSet::new()),
            fw_ready: AtomicBool::new(false),
            fw_dirty: tokio::sync::Notify::new(),
            held: Mutex::new(Default::default()),
        }
    }

    /// The operator confirmed a replaced store: the held removals go ahead; returns the
    /// networks to reconcile again.
    pub fn release_held(&self) -> Vec<u32> {
        std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }

    fn ctx(&self) -> HostContext {
        self.ctx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn write_status(&self, vni: u32, v: serde_json::Value) -> Result<(), ReconcileError> {
        let same = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vni)
            .map(|old| {
                // `since` changes on every write; compare the rest.
                let strip = |x: &serde_json::Value| {
                    let mut x = x.clone();
                    if let Some(o) = x.as_object_mut() {
                        o.remove("since");
                    }
                    x
                };
                strip(old) == strip(&v)
            });
        if same == Some(true) {
            return Ok(());
        }
        self.store
            .put(
                &network::status_key(vni, &self.node),
                serde_json::to_vec(&v).unwrap_or_default(),
            )
            .await?;
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vni, v);
        Ok(())
    }

    /// The dnsmasq of `vni`: ours in the map, else one a previous daemon left running
    /// (adopted by pid file and command line), taken out of the map.
    fn take_dnsmasq(&self, all: &mut BTreeMap<u32, Instance>, vni: u32) -> Option<Instance> {
        all.remove(&vni).or_else(|| {
            let paths = dnsmasq::Paths::new(&self.run_dir, &self.state_dir, vni);
            Instance::adopt(vni, paths, &self.dnsmasq_bin, &[])
        })
    }

    async fn fail(&self, vni: u32, e: &ObjectError) -> Result<Action, ReconcileError> {
        {
            // An invalid spec keeps the host as it is, a running dnsmasq included; one left by
            // a previous daemon is adopted so that it stops with this daemon (no orphan).
            let mut all = self.dnsmasq.lock().await;
            if !all.contains_key(&vni) {
                if let Some(inst) = self.take_dnsmasq(&mut all, vni) {
                    info!(network = vni, pid = inst.pid().unwrap_or(0),
                        "dnsmasq of an invalid network adopted; it keeps serving until the spec is fixed or the daemon stops");
                    all.insert(vni, inst);
                }
            }
        }
        let text = e.to_string();
        let new_error = self
            .invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vni, text.clone())
            .as_ref()
            != Some(&text);
        if new_error {
            warn!(network = vni, field = %e.field, reason = %e.reason, "network invalid; nothing changed on the host for it");
        }
        self.write_status(
            vni,
            json!({"state": "error", "error": e.to_string(), "field": e.field, "since": crate::hostinfo::now_rfc3339()}),
        )
        .await?;
        Ok(Action::AwaitChange)
    }

    async fn execute(&self, vni: u32, steps: &[Step]) -> Result<(), ReconcileError> {
        let h = &*self.host;
        let host_err = |e: debvisor_netconf::NetconfError| ReconcileError::Host(e.to_string());
        for s in steps {
            match s {
                Step::CreateVxlan(v) => {
                    h.ensure_vxlan(v).await.map_err(host_err)?;
                }
                Step::RecreateVxlan(v) => {
                    h.delete_link(&v.name).await.map_err(host_err)?;
                    h.ensure_vxlan(v).await.map_err(host_err)?;
                }
                Step::CreateVlan { link, parent, id } => {
                    h.ensure_vlan(link, parent, *id).await.map_err(host_err)?;
                }
                Step::CreateBridge { link } => {
                    h.ensure_bridge(link).await.map_err(host_err)?;
                    bridge_sysctls(link)?;
                }
                Step::SetMtu { link, mtu } => {
                    h.ensure_mtu(link, *mtu).await.map_err(host_err)?;
                }
                Step::SetMaster { link, master } => {
                    h.ensure_master(link, master).await.map_err(host_err)?;
                }
                Step::SetUp { link } => {
                    h.ensure_up(link).await.map_err(host_err)?;
                }
                Step::AddGateway { link, addr } => {
                    h.ensure_address(link, *addr, AddrOwner::Gateway)
                        .await
                        .map_err(host_err)?;
                    h.announce(link, *addr).await.map_err(host_err)?;
                }
                Step::RemoveGateway { link, addr } => {
                    h.remove_address(link, *addr).await.map_err(host_err)?;
                }
                Step::DeleteLink { link } => {
                    h.delete_link(link).await.map_err(host_err)?;
                }
            }
            info!(network = vni, change = %s, "network host change");
        }
        Ok(())
    }

    /// A network changed: ask the firewall worker for a new ruleset. Bursts coalesce into
    /// one atomic apply (100 networks at once cost one batch, not 100; see
    /// docs/benchmarks.md).
    async fn sync_firewall(&self) -> Result<(), ReconcileError> {
        if self.firewall.is_some() && self.fw_ready.load(Ordering::SeqCst) {
            self.fw_dirty.notify_one();
        }
        Ok(())
    }

    /// Build the ruleset from every applied network and make the table match it now.
    async fn apply_firewall_now(&self) -> Result<(), ReconcileError> {
        let Some(fw) = &self.firewall else {
            return Ok(());
        };
        let primary = self.ctx().primary;
        let nets: Vec<Network> = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut rules = Vec::new();
        for n in &nets {
            match network_rules(n, primary) {
                Ok(r) => rules.push(r),
                Err(e) => {
                    warn!(network = n.vni, field = %e.field, reason = %e.reason, "ACL not representable; network left out of the firewall")
                }
            }
        }
        fw.sync(rules)
            .await
            .map(|_| ())
            .map_err(ReconcileError::Host)
    }

    /// The worker behind [`NetworkHost::sync_firewall`]: waits for a change, lets the burst
    /// settle for 100 ms, applies once.
    pub fn spawn_firewall_worker(self: &Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        if self.firewall.is_none() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = this.fw_dirty.notified() => {}
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                }
                if let Err(e) = this.apply_firewall_now().await {
                    warn!(error = %e, "firewall update failed; retrying on the next resync");
                }
            }
        });
    }

    /// Every network of the first list is reconciled: from now on the firewall follows the
    /// applied networks.
    pub async fn firewall_ready(&self) {
        self.fw_ready.store(true, Ordering::SeqCst);
        self.resync_firewall().await;
    }

    /// Re-apply the firewall (resync tick): corrects a deleted rule.
    pub async fn resync_firewall(&self) {
        if !self.fw_ready.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.apply_firewall_now().await {
            warn!(error = %e, "firewall resync failed");
        }
    }

    async fn dnsmasq_for(&self, net: &Network, want: bool) -> Result<(), ReconcileError> {
        let mut all = self.dnsmasq.lock().await;
        let vni = net.vni;
        if !want {
            if let Some(inst) = self.take_dnsmasq(&mut all, vni) {
                inst.stop().await;
            }
            return Ok(());
        }
        if let Some(inst) = all.get_mut(&vni) {
            match inst.update(net) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    if let Some(old) = all.remove(&vni) {
                        info!(
                            network = vni,
                            "dnsmasq configuration changed; restarting it"
                        );
                        old.stop().await;
                    }
                }
                Err(e) => return Err(ReconcileError::Host(e.to_string())),
            }
        }
        let paths = dnsmasq::Paths::new(&self.run_dir, &self.state_dir, vni);
        // The leases the cluster knows (reported by whichever node was primary): a guest
        // keeps its address across a takeover. Unreadable: keep the local lease file.
        let seed = self.cluster_leases(vni).await;
        let inst = Instance::start(net, paths, &self.dnsmasq_bin, &[], seed.as_deref())
            .await
            .map_err(|e| ReconcileError::Host(e.to_string()))?;
        all.insert(vni, inst);
        Ok(())
    }

    /// The leases in etcd for `vni` (`None` when etcd does not answer).
    async fn cluster_leases(&self, vni: u32) -> Option<Vec<dnsmasq::Lease>> {
        let (kvs, _) = self
            .store
            .list(&format!("{}{vni}/leases/", network::NETWORKS_PREFIX))
            .await
            .ok()?;
        Some(
            kvs.iter()
                .filter_map(|kv| serde_json::from_slice::<dnsmasq::Lease>(&kv.value).ok())
                .collect(),
        )
    }

    /// Report dnsmasq's leases of `vni` to etcd (only what changed).
    async fn report_leases(&self, vni: u32) -> Result<(), ReconcileError> {
        let current = {
            let all = self.dnsmasq.lock().await;
            match all.get(&vni) {
                Some(i) => i.leases(),
                None => return Ok(()),
            }
        };
        let before = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vni)
            .cloned()
            .unwrap_or_default();
        if before == current {
            return Ok(());
        }
        for (mac, l) in &current {
            if before.get(mac) != Some(l) {
                self.store
                    .put(
                        &network::lease_key(vni, mac),
                        serde_json::to_vec(l).unwrap_or_default(),
                    )
                    .await?;
                info!(network = vni, mac = %mac, ip = %l.ip, hostname = l.hostname.as_deref().unwrap_or("-"), "DHCP lease reported");
            }
        }
        for mac in before.keys().filter(|m| !current.contains_key(*m)) {
            self.store.delete(&network::lease_key(vni, mac)).await?;
        }
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vni, current);
        Ok(())
    }

    async fn remove(&self, vni: u32) -> Result<Action, ReconcileError> {
        // A replaced store (wiped, restored) is no evidence anyone removed the network.
        if let Some(c) = self.store.store_change() {
            if self
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vni)
            {
                warn!(network = vni, node = %self.node, reason = %c.reason, "network missing from etcd while the store is found replaced; bridge, gateway and dnsmasq left as they are until an operator confirms");
            }
            return Ok(Action::AwaitChange);
        }
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vni);
        self.invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vni);
        let had_dnsmasq = {
            let mut all = self.dnsmasq.lock().await;
            self.take_dnsmasq(&mut all, vni)
        };
        if let Some(inst) = had_dnsmasq {
            inst.stop().await;
        }
        let obs = self
            .host
            .observe()
            .await
            .map_err(|e| ReconcileError::Host(e.to_string()))?;
        let steps = network_plan::plan_removal(vni, &obs);
        self.execute(vni, &steps).await?;
        let was = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vni)
            .is_some();
        if was || !steps.is_empty() {
            info!(
                network = vni,
                links = steps.len(),
                "network removed from this host"
            );
        }
        self.sync_firewall().await?;
        self.store
            .delete(&network::status_key(vni, &self.node))
            .await?;
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vni);
        if self.ctx().primary {
            let (leases, _) = self
                .store
                .list(&format!("{}{vni}/leases/", network::NETWORKS_PREFIX))
                .await?;
            for kv in leases {
                self.store.delete(&kv.key).await?;
            }
            self.leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&vni);
        }
        Ok(Action::AwaitChange)
    }

    /// VNIs with our bridges on the host (to sweep networks deleted while we were away).
    pub async fn host_vnis(&self) -> Vec<u32> {
        match self.host.observe().await {
            Ok(o) => network_plan::host_vnis(&o).into_iter().collect(),
            Err(e) => {
                warn!(error = %e, "cannot observe host links for the network sweep");
                Vec::new()
            }
        }
    }

    /// Stop every dnsmasq we run, adopted ones of invalid networks included (daemon
    /// shutdown; bridges and guests stay).
    /// The role changed: every network is planned with the new flag. Losing the role stops
    /// every dnsmasq at once, without etcd (the reconciles then remove the gateways, also
    /// host-only); the firewall's DHCP/DNS rules follow.
    pub async fn set_primary(&self, primary: bool) {
        let was = {
            let mut ctx = self.ctx.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut ctx.primary, primary)
        };
        if was == primary {
            return;
        }
        if !primary {
            self.stop_all().await;
            self.leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        let _ = self.sync_firewall().await;
    }

    pub async fn stop_all(&self) {
        let all = std::mem::take(&mut *self.dnsmasq.lock().await);
        for (_, inst) in all {
            inst.stop().await;
        }
    }

    async fn apply(&self, net: &Network) -> Result<Action, ReconcileError> {
        let vni = net.vni;
        let others: Vec<Network> = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.vni != vni)
            .cloned()
            .collect();
        for (a, b, p) in network::overlapping(others.iter().chain(std::iter::once(net))) {
            if a == vni || b == vni {
                let other = if a == vni { b } else { a };
                let fam = if p.is_v6() { "ipv6" } else { "ipv4" };
                return self
                    .fail(
                        vni,
                        &ObjectError::new(
                            format!("spec.{fam}.network"),
                            format!("overlaps network {other}"),
                        ),
                    )
                    .await;
            }
        }
        let mut ctx = self.ctx();
        let obs = self
            .host
            .observe()
            .await
            .map_err(|e| ReconcileError::Host(e.to_string()))?;
        if let Some(dev) = ctx.vxlan_dev.as_ref().and_then(|d| obs.link(d)) {
            ctx.underlay_mtu = dev.mtu;
        }
        let plan = match network_plan::plan_host(net, &ctx, &obs) {
            Ok(p) => p,
            Err(e) => return self.fail(vni, &e).await,
        };
        let rules = match network_rules(net, ctx.primary) {
            Ok(r) => r,
            Err(e) => return self.fail(vni, &e).await,
        };
        let changed = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vni)
            != Some(net);
        if let (true, Some(fw)) = (changed, &self.firewall) {
            let others: Vec<NetworkRules> = others
                .iter()
                .filter_map(|n| network_rules(n, ctx.primary).ok())
                .collect();
            if let Err(e) = fw.check(others, rules).await {
                return self.fail(vni, &e).await;
            }
        }
        self.execute(vni, &plan.steps).await?;
        if plan.clamped {
            info!(network = vni, requested = ?net.mtu, mtu = plan.mtu, "network MTU clamped to the cluster MTU − 50");
        }
        let first = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vni, net.clone())
            .as_ref()
            != Some(net);
        if first {
            self.sync_firewall().await?;
        }
        let dhcp = ctx.primary
            && net.kind == NetworkType::Managed
            && net.ipv4.as_ref().and_then(|f| f.gateway).is_some();
        self.dnsmasq_for(net, dhcp).await?;
        if dhcp {
            self.report_leases(vni).await?;
        }
        let was_invalid = self
            .invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vni);
        if let Some(before) = was_invalid {
            info!(network = vni, before = %before, "network valid again");
        }
        self.write_status(
            vni,
            json!({
                "state": "ready",
                "bridge": net.bridge_name(),
                "link": net.link_name(),
                "mtu": plan.mtu,
                "clamped": plan.clamped,
                "gateway": ctx.primary && net.kind == NetworkType::Managed,
                "dhcp": dhcp,
                "since": crate::hostinfo::now_rfc3339(),
            }),
        )
        .await?;
        if !plan.steps.is_empty() {
            info!(
                network = vni,
                changes = plan.steps.len(),
                mtu = plan.mtu,
                "network converged on this host"
            );
        }
        Ok(Action::AwaitChange)
    }
}

/// The reconciler handed to the reactor.
#[derive(Clone)]
pub struct NetworkReconciler(pub Arc<NetworkHost>);

impl Reconciler<NetworkKind> for NetworkReconciler {
    async fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<Network>>>,
    ) -> Result<Action, ReconcileError> {
        let Ok(vni) = id.parse::<u32>() else {
            let mut ignored = self.0.ignored_ids.lock().unwrap_or_else(|p| p.into_inner());
            if entry.is_none() {
                ignored.remove(id);
            } else if ignored.insert(id.to_string()) {
                warn!(network = %id, "network key with a non-numeric VNI ignored");
            }
            return Ok(Action::AwaitChange);
        };
        match entry {
            None => self.0.remove(vni).await,
            Some(e) => match &e.parsed {
                Err(err) if err.field == "spec" && !e.keys.contains_key("spec") => {
                    self.0.remove(vni).await
                }
                Err(err) => self.0.fail(vni, err).await,
                Ok(net) => self.0.apply(net).await,
            },
        }
    }
}

/// The firewall view of every valid network in etcd, for the firewall stage (before the
/// Network reactor runs), so the first ruleset already carries every network's chains.
pub async fn network_rules_from_store(
    store: &Store,
    primary: bool,
) -> Result<Vec<NetworkRules>, String> {
    let (kvs, _) = store
        .list(network::NETWORKS_PREFIX)
        .await
        .map_err(|e| e.to_string())?;
    let grouped = debvisor_objects::reactor::group_keys(network::NETWORKS_PREFIX, kvs, |_| true);
    Ok(grouped
        .into_iter()
        .filter_map(|(id, keys)| network::parse_network(&id, &keys).ok())
        .filter_map(|n| network_rules(&n, primary).ok())
        .collect())
}
