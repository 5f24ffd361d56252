//! Network namespaces for the `partition` nemesis (ADR 0031): every storenode runs in a
//! network namespace of its own, wired by a veth pair to a bridge that lives in one more
//! namespace; the host namespace (runner, etcd, placement, proxies) has one veth end in the
//! bridge subnet. The subnet is a private `10.a.b.0/24` chosen per run (never one the host
//! routes already). Partitions are iptables DROP rules inside the storenodes' namespaces
//! ([`plan`] decides them, purely); heal flushes them. Everything is deleted on [`Drop`], and
//! [`remove_leftovers`] deletes what a killed run left (names carry the run's pid).

use rand::Rng;
use rand::rngs::StdRng;
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors of the namespace set-up and of iptables.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not run or failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr, or why it could not run.
        detail: String,
    },
    /// No free private subnet.
    #[error("no free 10.x.y.0/24 subnet for the run's namespaces")]
    NoSubnet,
}

/// Result alias.
pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

/// Prefix of every namespace name (`skvc-<pid>-<n>-...`) and interface name (`sc<pid><c>...`).
const NS_PREFIX: &str = "skvc-";
const IF_PREFIX: &str = "sc";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command; its stderr on failure.
fn run(args: &[&str]) -> Result<String> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetnsError::Command {
            cmd: cmd.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            cmd,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces, veths and bridge of one cluster.
pub struct Netns {
    /// `skvc-<pid>-<n>`.
    ns_base: String,
    /// `sc<pid><c>`.
    if_base: String,
    /// `10.a.b`.
    net: String,
    stores: usize,
    /// Namespaces created so far (deleted on drop, last first).
    created: Vec<String>,
    host_veth: Option<String>,
}

/// One DROP rule: inside storenode `in_store`'s namespace, drop packets to (`Out`) or from
/// (`In`) `peer`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DropRule {
    /// The storenode (index) whose namespace holds the rule.
    pub in_store: usize,
    /// Outgoing (`-A OUTPUT -d`) or incoming (`-A INPUT -s`).
    pub dir: Dir,
    /// The other end.
    pub peer: Peer,
}

/// Direction of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    /// Packets this store sends.
    Out,
    /// Packets this store receives.
    In,
}

/// The other end of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    /// Another storenode (index).
    Store(usize),
    /// The host namespace: placement and the proxies.
    Host,
}

/// The partition shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A minority of storenodes (one; two of five or more) cut from the rest, in both directions.
    Minority,
    /// Two halves cut from each other, one storenode in both (it sees everyone).
    Bridge,
    /// One storenode's packets to another are dropped; the other direction flows.
    OneWay,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Minority, Shape::Bridge, Shape::OneWay];

    /// Its name in nemesis events.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Minority => "majority-minority",
            Shape::Bridge => "bridge",
            Shape::OneWay => "one-way",
        }
    }
}

/// A decided partition: its rules and a description for the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The shape.
    pub shape: Shape,
    /// Storenodes on the cut-off side (minority) or the sending side (one-way); empty for a bridge.
    pub isolated: Vec<usize>,
    /// The rules.
    pub rules: Vec<DropRule>,
    /// E.g. `{0} | {1,2}, store-0 also cut from placement and proxies`.
    pub text: String,
}

fn set(v: &[usize]) -> String {
    format!(
        "{{{}}}",
        v.iter().map(|i| format!("store-{i}")).collect::<Vec<_>>().join(",")
    )
}

/// Both directions between `a` and `b`, as rules in `a`'s namespace (enough: a drops what
/// it sends to `b` and what it receives from `b`).
fn cut(rules: &mut BTreeSet<DropRule>, a: usize, b: Peer) {
    for dir in [Dir::Out, Dir::In] {
        rules.insert(DropRule {
            in_store: a,
            dir,
            peer: b,
        });
    }
}

/// Decides a partition of `n` storenodes (pure; the choices come from `rng`). `free` are
/// the storenodes no other fault uses: the isolated or sending side is picked among them.
pub fn plan(shape: Shape, n: usize, free: &[usize], rng: &mut StdRng) -> Option<Partition> {
    if n < 2 || free.is_empty() {
        return None;
    }
    let mut rules = BTreeSet::new();
    let pick = |rng: &mut StdRng, from: &[usize]| from[rng.random_range(0..from.len())];
    match shape {
        Shape::Minority => {
            let size = if n >= 5 { 2 } else { 1 };
            let mut minority = vec![pick(rng, free)];
            while minority.len() < size {
                let rest: Vec<usize> = (0..n).filter(|i| !minority.contains(i)).collect();
                minority.push(pick(rng, &rest));
            }
            minority.sort_unstable();
            let majority: Vec<usize> = (0..n).filter(|i| !minority.contains(i)).collect();
            for &a in &minority {
                for &b in &majority {
                    cut(&mut rules, a, Peer::Store(b));
                }
            }
            // Half the time the minority loses placement and the proxies too (a node cut
            // from the whole cluster, not only from its peers).
            let from_host = rng.random_bool(0.5);
            if from_host {
                for &a in &minority {
                    cut(&mut rules, a, Peer::Host);
                }
            }
            let text = format!(
                "{} | {}{}",
                set(&minority),
                set(&majority),
                if from_host {
                    ", the minority also cut from placement and the proxies"
                } else {
                    ", placement and the proxies reach both sides"
                }
            );
            Some(Partition {
                shape,
                isolated: minority,
                rules: rules.into_iter().collect(),
                text,
            })
        }
        Shape::Bridge => {
            if n < 3 {
                return None;
            }
            let bridge = pick(rng, free);
            let mut rest: Vec<usize> = (0..n).filter(|i| *i != bridge).collect();
            // Shuffle, then halve.
            for i in (1..rest.len()).rev() {
                let j = rng.random_range(0..=i);
                rest.swap(i, j);
            }
            let (left, right) = rest.split_at(rest.len() / 2);
            let (mut left, mut right) = (left.to_vec(), right.to_vec());
            left.sort_unstable();
            right.sort_unstable();
            for &a in &left {
                for &b in &right {
                    cut(&mut rules, a, Peer::Store(b));
                }
            }
            let text = format!("{} | {}, store-{bridge} reaches both halves", set(&left), set(&right));
            Some(Partition {
                shape,
                isolated: Vec::new(),
                rules: rules.into_iter().collect(),
                text,
            })
        }
        Shape::OneWay => {
            let from = pick(rng, free);
            let others: Vec<usize> = (0..n).filter(|i| *i != from).collect();
            let to = pick(rng, &others);
            rules.insert(DropRule {
                in_store: from,
                dir: Dir::Out,
                peer: Peer::Store(to),
            });
            Some(Partition {
                shape,
                isolated: vec![from],
                rules: rules.into_iter().collect(),
                text: format!("store-{from} -> store-{to} dropped, store-{to} -> store-{from} flows"),
            })
        }
    }
}

/// Whether `10.a.b.0/24` overlaps anything the host has (an address or a route).
fn subnet_taken(routes: &str, a: u8, b: u8) -> bool {
    let net = format!("10.{a}.{b}.");
    routes.contains(&net) || routes.lines().any(|l| l.starts_with("default") && l.contains(&net))
}

impl Netns {
    /// Creates the bridge namespace, one namespace per storenode with its veth into the
    /// bridge, and the host's veth end. Deletes what it created if a step fails.
    pub fn create(stores: usize) -> Result<Netns> {
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let routes = format!(
            "{}\n{}",
            run(&["ip", "-4", "-o", "route", "show", "table", "all"]).unwrap_or_default(),
            run(&["ip", "-4", "-o", "addr"]).unwrap_or_default()
        );
        // 10.a.b.0/24 from the pid and the sequence number; the next free one if taken.
        let start = (pid.wrapping_mul(31).wrapping_add(seq.wrapping_mul(7919))) % (128 * 256);
        let (a, b) = (0..128 * 256)
            .map(|k| (start + k) % (128 * 256))
            .map(|x| ((64 + x / 256) as u8, (x % 256) as u8))
            .find(|(a, b)| !subnet_taken(&routes, *a, *b))
            .ok_or(NetnsError::NoSubnet)?;
        let letter = (b'a' + (seq % 26) as u8) as char;
        let mut n = Netns {
            ns_base: format!("{NS_PREFIX}{pid}-{seq}"),
            if_base: format!("{IF_PREFIX}{pid}{letter}"),
            net: format!("10.{a}.{b}"),
            stores,
            created: Vec::new(),
            host_veth: None,
        };
        n.build()?;
        Ok(n)
    }

    fn build(&mut self) -> Result<()> {
        let br = self.bridge_ns();
        self.add_ns(&br)?;
        run(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &br, "link", "set", "br0", "up"])?;
        let (h, hb) = (format!("{}h", self.if_base), format!("{}hb", self.if_base));
        run(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &hb])?;
        self.host_veth = Some(h.clone());
        run(&["ip", "link", "set", &hb, "netns", &br])?;
        run(&["ip", "-n", &br, "link", "set", &hb, "master", "br0", "up"])?;
        run(&["ip", "addr", "add", &format!("{}/24", self.host_ip()), "dev", &h])?;
        run(&["ip", "link", "set", &h, "up"])?;
        for i in 0..self.stores {
            let ns = self.store_ns(i);
            self.add_ns(&ns)?;
            let (a, b) = (format!("{}a{i}", self.if_base), format!("{}b{i}", self.if_base));
            run(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            run(&["ip", "link", "set", &a, "netns", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", &a, "name", "eth0"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.store_ip(i)),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "link", "set", &b, "netns", &br])?;
            run(&["ip", "-n", &br, "link", "set", &b, "master", "br0", "up"])?;
        }
        Ok(())
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        run(&["ip", "netns", "add", ns])?;
        self.created.push(ns.to_string());
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.ns_base)
    }

    /// The namespace of storenode `i`.
    pub fn store_ns(&self, i: usize) -> String {
        format!("{}-s{i}", self.ns_base)
    }

    /// The host namespace's address in the bridge subnet (placement listens on it).
    pub fn host_ip(&self) -> String {
        format!("{}.1", self.net)
    }

    /// Storenode `i`'s address.
    pub fn store_ip(&self, i: usize) -> String {
        format!("{}.{}", self.net, 10 + i)
    }

    /// The subnet, `10.a.b.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.net)
    }

    fn peer_ip(&self, p: Peer) -> String {
        match p {
            Peer::Store(i) => self.store_ip(i),
            Peer::Host => self.host_ip(),
        }
    }

    /// Installs the rules (iptables in the storenodes' namespaces).
    pub fn apply(&self, rules: &[DropRule]) -> Result<()> {
        for r in rules {
            let ns = self.store_ns(r.in_store);
            let ip = self.peer_ip(r.peer);
            let (chain, flag) = match r.dir {
                Dir::Out => ("OUTPUT", "-d"),
                Dir::In => ("INPUT", "-s"),
            };
            run(&[
                "ip", "netns", "exec", &ns, "iptables", "-w", "-A", chain, flag, &ip, "-j", "DROP",
            ])?;
        }
        Ok(())
    }

    /// Removes every rule of every storenode namespace; returns how many it removed.
    pub fn heal(&self) -> Result<usize> {
        let mut removed = 0;
        let mut first_err = None;
        for i in 0..self.stores {
            let ns = self.store_ns(i);
            match run(&["ip", "netns", "exec", &ns, "iptables", "-w", "-S"]) {
                Ok(s) => removed += s.lines().filter(|l| l.starts_with("-A ")).count(),
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            }
            if let Err(e) = run(&["ip", "netns", "exec", &ns, "iptables", "-w", "-F"]) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// The DROP rules in force, per storenode (for tests and events).
    pub fn rules_in_force(&self) -> Result<usize> {
        let mut n = 0;
        for i in 0..self.stores {
            let s = run(&["ip", "netns", "exec", &self.store_ns(i), "iptables", "-w", "-S"])?;
            n += s.lines().filter(|l| l.starts_with("-A ")).count();
        }
        Ok(n)
    }

    /// The names of the namespaces this set created (bridge first).
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(h) = self.host_veth.take() {
            let _ = run(&["ip", "link", "del", &h]);
        }
        for ns in self.created.drain(..).rev() {
            kill_pids_in(&ns);
            let _ = run(&["ip", "netns", "del", &ns]);
        }
    }
}

/// SIGKILLs the processes left in namespace `ns` (a killed run's storenodes).
fn kill_pids_in(ns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            if pid.chars().all(|c| c.is_ascii_digit()) {
                let _ = run(&["kill", "-9", pid]);
            }
        }
    }
}

/// The pid in a name made by a run: `skvc-<pid>-...` or `sc<pid><letter>...`.
fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX).or_else(|| name.strip_prefix(IF_PREFIX))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Deletes the namespaces and host veths of runs whose process is gone (a run killed
/// before its Drop), killing what still runs in them. Returns what it deleted.
pub fn remove_leftovers() -> Vec<String> {
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let mut done = Vec::new();
    if let Ok(links) = run(&["ip", "-o", "link", "show"]) {
        for l in links.lines() {
            // `12: sc123ah@if11: <...`
            let Some(name) = l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else {
                continue;
            };
            if name.starts_with(IF_PREFIX)
                && let Some(pid) = pid_of(name)
                && !alive(pid)
                && run(&["ip", "link", "del", name]).is_ok()
            {
                done.push(format!("link {name}"));
            }
        }
    }
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for l in list.lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if name.starts_with(NS_PREFIX)
                && let Some(pid) = pid_of(name)
                && !alive(pid)
            {
                kill_pids_in(name);
                if run(&["ip", "netns", "del", name]).is_ok() {
                    done.push(format!("netns {name}"));
                }
            }
        }
    }
    done
}

/// Whether `ip netns` and `iptables` work here (root, iproute2, iptables).
pub fn available() -> Result<()> {
    run(&["iptables", "-V"])?;
    let probe = format!("{NS_PREFIX}{}-probe", std::process::id());
    run(&["ip", "netns", "add", &probe])?;
    let r = run(&["ip", "netns", "exec", &probe, "iptables", "-w", "-S"]);
    let _ = run(&["ip", "netns", "del", &probe]);
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn peers_cut(p: &Partition, a: usize, b: usize) -> bool {
        p.rules
            .iter()
            .any(|r| (r.in_store == a && r.peer == Peer::Store(b)) || (r.in_store == b && r.peer == Peer::Store(a)))
    }

    #[test]
    fn minority_is_cut_from_every_majority_node_both_ways() {
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let p = plan(Shape::Minority, 3, &[0, 1, 2], &mut rng).unwrap();
            assert_eq!(p.isolated.len(), 1);
            let m = p.isolated[0];
            for o in (0..3).filter(|o| *o != m) {
                for dir in [Dir::Out, Dir::In] {
                    assert!(p.rules.contains(&DropRule {
                        in_store: m,
                        dir,
                        peer: Peer::Store(o)
                    }));
                }
            }
            // The majority still talks to itself.
            let maj: Vec<usize> = (0..3).filter(|o| *o != m).collect();
            assert!(!peers_cut(&p, maj[0], maj[1]));
            // Only the minority's namespace holds rules.
            assert!(p.rules.iter().all(|r| r.in_store == m));
        }
        let mut rng = StdRng::seed_from_u64(1);
        let p = plan(Shape::Minority, 5, &[3], &mut rng).unwrap();
        assert_eq!(p.isolated.len(), 2);
        assert!(p.isolated.contains(&3));
    }

    #[test]
    fn minority_is_sometimes_cut_from_placement() {
        let with_host = (0..40)
            .filter(|s| {
                let mut rng = StdRng::seed_from_u64(*s);
                let p = plan(Shape::Minority, 3, &[0, 1, 2], &mut rng).unwrap();
                p.rules.iter().any(|r| r.peer == Peer::Host)
            })
            .count();
        assert!(with_host > 0 && with_host < 40, "{with_host}");
    }

    #[test]
    fn a_bridge_sees_both_halves_which_do_not_see_each_other() {
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = 3 + (seed as usize % 3);
            let p = plan(Shape::Bridge, n, &[1], &mut rng).unwrap();
            assert!(p.isolated.is_empty());
            for o in (0..n).filter(|o| *o != 1) {
                assert!(!peers_cut(&p, 1, o), "the bridge is cut from {o}: {p:?}");
            }
            let cut_pairs = (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .filter(|(a, b)| peers_cut(&p, *a, *b))
                .count();
            let (l, r) = ((n - 1) / 2, n - 1 - (n - 1) / 2);
            assert_eq!(cut_pairs, l * r, "{p:?}");
        }
        assert!(plan(Shape::Bridge, 2, &[0, 1], &mut StdRng::seed_from_u64(0)).is_none());
    }

    #[test]
    fn one_way_drops_one_direction_only() {
        let mut rng = StdRng::seed_from_u64(7);
        let p = plan(Shape::OneWay, 3, &[2], &mut rng).unwrap();
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].in_store, 2);
        assert_eq!(p.rules[0].dir, Dir::Out);
        assert!(matches!(p.rules[0].peer, Peer::Store(t) if t != 2));
    }

    #[test]
    fn nothing_to_partition() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(plan(Shape::Minority, 1, &[0], &mut rng).is_none());
        assert!(plan(Shape::Minority, 3, &[], &mut rng).is_none());
    }

    #[test]
    fn names_carry_the_pid() {
        assert_eq!(pid_of("skvc-1234-0-br"), Some(1234));
        assert_eq!(pid_of("sc1234ah"), Some(1234));
        assert_eq!(pid_of("eth0"), None);
        assert!(subnet_taken("10.64.3.0/24 dev x", 64, 3));
        assert!(!subnet_taken("10.64.3.0/24 dev x", 64, 4));
    }
}
