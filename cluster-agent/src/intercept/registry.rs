//! The sessions registered with this agent and their routes: who may
//! register what, which session a request goes to and which get a copy,
//! and what each session got ([`Traffic`], in every reply). Leases are
//! checked when asked: a session not heard from for the lease is dead, its
//! routes match nothing and anyone may take them; a registration sweeps
//! the dead.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tpd_wire::intercept::{Mirror, Reply, Request, Route, Traffic};

/// Where a matching request goes: the session, and what reaching it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub session: String,
    pub token: String,
    /// `user@host`, for the answer when the session cannot be reached.
    pub holder: String,
    /// The intercept port of the agent whose tunnel the session holds.
    pub home: SocketAddr,
}

struct Session {
    target: Target,
    since: String,
    routes: Vec<Route>,
    heard: Instant,
    /// Kept when the session registers again (a new home, a redial).
    counts: Counts,
}

/// What a session got here since it registered.
#[derive(Default)]
struct Counts {
    last_minute: Minute,
    mirrored: u64,
    dropped: u64,
}

/// Events of the last 60 s, in one-second buckets: (second, count).
struct Minute([(u64, u64); 60]);

impl Default for Minute {
    fn default() -> Self {
        Minute([(0, 0); 60])
    }
}

impl Minute {
    fn add(&mut self, second: u64) {
        let bucket = &mut self.0[(second % 60) as usize];
        if bucket.0 != second {
            *bucket = (second, 0);
        }
        bucket.1 += 1;
    }

    fn total(&self, now: u64) -> u64 {
        self.0.iter().filter(|(s, _)| *s + 60 > now).map(|(_, n)| n).sum()
    }
}

/// Whether a copy reached its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    Answered,
    Dropped,
}

pub struct Registry {
    /// The real container's intercepted ports: the only ones a route may name.
    ports: BTreeSet<u16>,
    lease: Duration,
    /// In the order first registered: the first matching route wins.
    sessions: Mutex<Vec<Session>>,
    /// Ports where a client spoke TLS, which sessions are told of.
    tls_ports: Mutex<BTreeSet<u16>>,
    /// Where the seconds of [`Minute`] count from.
    started: Instant,
}

impl Registry {
    pub fn new(ports: impl IntoIterator<Item = u16>, lease: Duration) -> Self {
        Registry {
            ports: ports.into_iter().collect(),
            lease,
            sessions: Mutex::default(),
            tls_ports: Mutex::default(),
            started: Instant::now(),
        }
    }

    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn sessions(&self) -> MutexGuard<'_, Vec<Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, s: &Session) -> bool {
        s.heard.elapsed() < self.lease
    }

    /// The session a request on `port` with `path` and headers goes to, if any.
    pub fn route<'a, I>(&self, port: u16, path: &str, header: impl Fn(&str) -> I) -> Option<Target>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let second = self.second();
        let mut sessions = self.sessions();
        let matches = |s: &&mut Session| {
            s.routes.iter().any(|r| r.mirror.is_none() && r.port == port && r.filter.matches(path, &header))
        };
        let session = sessions.iter_mut().filter(|s| self.live(s)).find(matches)?;
        session.counts.last_minute.add(second);
        Some(session.target.clone())
    }

    /// The sessions that get a copy of a request on `port`, each with how.
    pub fn mirrors<'a, I>(&self, port: u16, path: &str, header: impl Fn(&str) -> I) -> Vec<(Target, Mirror)>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let sessions = self.sessions();
        let copies = sessions.iter().filter(|s| self.live(s)).filter_map(|s| {
            let route = s.routes.iter().find(|r| r.port == port && r.filter.matches(path, &header))?;
            Some((s.target.clone(), route.mirror?))
        });
        copies.collect()
    }

    /// Counts a copy sent to `session` (or dropped on the way).
    pub fn copied(&self, session: &str, outcome: Copied) {
        let second = self.second();
        if let Some(s) = self.sessions().iter_mut().find(|s| s.target.session == session) {
            match outcome {
                Copied::Answered => {
                    s.counts.mirrored += 1;
                    s.counts.last_minute.add(second);
                }
                Copied::Dropped => s.counts.dropped += 1,
            }
        }
    }

    /// Notes that a client spoke TLS on `port`.
    pub fn saw_tls(&self, port: u16) {
        self.tls_ports.lock().unwrap_or_else(|p| p.into_inner()).insert(port);
    }

    /// What `session` got here, for its replies.
    fn traffic(&self, session: &str) -> Traffic {
        let tls = self.tls_ports.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = self.second();
        let sessions = self.sessions();
        let Some(s) = sessions.iter().find(|s| s.target.session == session) else {
            return Traffic::default();
        };
        let mut tls_ports: Vec<u16> = s.routes.iter().map(|r| r.port).filter(|p| tls.contains(p)).collect();
        tls_ports.dedup();
        Traffic {
            last_minute: s.counts.last_minute.total(now),
            mirrored: s.counts.mirrored,
            dropped: s.counts.dropped,
            tls_ports,
        }
    }

    /// Whether a relay for `session` with `token` to `port` may reach it.
    pub fn relay_allowed(&self, session: &str, token: &str, port: u16) -> bool {
        self.sessions().iter().any(|s| {
            s.target.session == session
                && s.target.token == token
                && self.live(s)
                && s.routes.iter().any(|r| r.port == port)
        })
    }

    /// Whether `session` is registered and within its lease: the router
    /// keeps a session's shared HTTP/2 connection only while it is.
    pub fn is_live(&self, session: &str) -> bool {
        self.sessions().iter().any(|s| s.target.session == session && self.live(s))
    }

    fn register(&self, target: Target, since: String, routes: Vec<Route>) -> Result<(), String> {
        if routes.is_empty() {
            return Err("a registration needs at least one route".into());
        }
        if let Some(r) = routes.iter().find(|r| r.filter.is_empty() && r.mirror.is_none()) {
            return Err(format!("the route on port {} has an empty filter; that is a swap", r.port));
        }
        if let Some(r) = routes.iter().find(|r| !self.ports.contains(&r.port)) {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            return Err(format!("port {} is not intercepted here (only {})", r.port, ports.join(", ")));
        }
        let mut sessions = self.sessions();
        sessions.retain(|s| self.live(s));
        for other in sessions.iter() {
            let held = |what: String| format!("{what} is held by {} since {}", other.target.holder, other.since);
            if other.target.session == target.session {
                if other.target.token != target.token {
                    return Err(held(format!("session {}", target.session)));
                }
                continue;
            }
            // Copies go to every session that asks; a request, to one.
            if let Some(r) = routes.iter().find(|r| r.mirror.is_none() && other.routes.contains(r)) {
                return Err(held(format!("the intercept of port {} for {}", r.port, r.filter)));
            }
        }
        let mut session = Session { target, since, routes, heard: Instant::now(), counts: Counts::default() };
        match sessions.iter_mut().find(|s| s.target.session == session.target.session) {
            Some(old) => {
                session.counts = std::mem::take(&mut old.counts);
                *old = session;
            }
            None => sessions.push(session),
        }
        Ok(())
    }

    fn renew(&self, session: &str, token: &str) -> Result<(), String> {
        let mut sessions = self.sessions();
        match sessions.iter_mut().find(|s| s.target.session == session && s.target.token == token) {
            Some(s) if s.heard.elapsed() < self.lease => {
                s.heard = Instant::now();
                Ok(())
            }
            _ => Err(format!("the registration of session {session} lapsed; register again")),
        }
    }

    fn unregister(&self, session: &str, token: &str) {
        self.sessions().retain(|s| !(s.target.session == session && s.target.token == token));
    }
}

/// One `Register` stream: the session it registered, which only it (or
/// another stream with the session's token) may renew or remove.
#[derive(Default)]
pub struct RegisterStream {
    bound: Option<(String, String)>,
}

impl RegisterStream {
    pub fn handle(&mut self, registry: &Registry, request: Request) -> Reply {
        let outcome = match request {
            Request::Register { session, token, holder, since, home, routes } => match &self.bound {
                Some((bound, _)) if *bound != session => {
                    Err(format!("this stream registered session {bound}; open another for {session}"))
                }
                _ => {
                    let target = Target { session: session.clone(), token: token.clone(), holder, home };
                    let done = registry.register(target, since, routes);
                    if done.is_ok() {
                        self.bound = Some((session, token));
                    }
                    done
                }
            },
            Request::Renew => match &self.bound {
                Some((session, token)) => registry.renew(session, token),
                None => Err("nothing to renew: this stream registered no session".into()),
            },
            Request::Unregister => {
                if let Some((session, token)) = self.bound.take() {
                    registry.unregister(&session, &token);
                }
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {
                let traffic = self.bound.as_ref().map(|(s, _)| registry.traffic(s)).unwrap_or_default();
                Reply::Ok { traffic }
            }
            Err(message) => Reply::Refused { message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::testing;
    use tpd_wire::intercept::Filter;

    fn route(port: u16, dev: &str) -> Route {
        Route {
            port,
            filter: Filter { headers: [("x-dev".into(), dev.into())].into(), path_prefix: None, ..Filter::default() },
            mirror: None,
        }
    }

    fn register(session: &str, token: &str, routes: Vec<Route>) -> Request {
        testing::register(session, token, "10.244.0.7:7711".parse().unwrap(), routes)
    }

    fn refused(reply: Reply) -> String {
        match reply {
            Reply::Refused { message } => message,
            Reply::Ok { .. } => panic!("accepted"),
        }
    }

    fn to(registry: &Registry, port: u16, dev: &str) -> Option<String> {
        registry.route(port, "/", |n| if n == "x-dev" { vec![dev.as_bytes()] } else { vec![] }).map(|t| t.session)
    }

    #[tokio::test]
    async fn a_route_held_by_a_live_session_is_refused_naming_its_holder() {
        let registry = Registry::new([8080, 9090], Duration::from_secs(15));
        let (mut alice, mut bob) = (RegisterStream::default(), RegisterStream::default());
        assert!(alice.handle(&registry, register("alice", "ta", vec![route(8080, "alice")])).is_ok());
        let msg = refused(bob.handle(&registry, register("bob", "tb", vec![route(8080, "alice")])));
        assert!(msg.contains("alice@laptop") && msg.contains("2026-12-07T10:00:00Z"), "{msg}");
        assert!(msg.contains("8080") && msg.contains("x-dev=alice"), "{msg}");
        // The same filter on another port, or another filter, is free.
        assert!(bob.handle(&registry, register("bob", "tb", vec![route(9090, "alice")])).is_ok());
        assert_eq!(to(&registry, 8080, "alice").as_deref(), Some("alice"));
        assert_eq!(to(&registry, 9090, "alice").as_deref(), Some("bob"));
        assert_eq!(to(&registry, 8080, "carol"), None);
    }

    #[tokio::test]
    async fn routes_must_name_an_intercepted_port_and_a_filter() {
        let registry = Registry::new([8080], Duration::from_secs(15));
        let mut s = RegisterStream::default();
        assert!(refused(s.handle(&registry, register("a", "t", vec![route(5432, "a")]))).contains("5432"));
        let empty = Route { port: 8080, filter: Filter::default(), mirror: None };
        assert!(refused(s.handle(&registry, register("a", "t", vec![empty]))).contains("empty filter"));
        assert!(refused(s.handle(&registry, register("a", "t", vec![]))).contains("at least one route"));
    }

    #[tokio::test]
    async fn only_the_sessions_token_changes_it() {
        let registry = Registry::new([8080], Duration::from_secs(15));
        let mut owner = RegisterStream::default();
        assert!(owner.handle(&registry, register("s", "secret", vec![route(8080, "a")])).is_ok());
        // Another stream without the token can neither take nor renew nor remove it.
        let mut stranger = RegisterStream::default();
        let msg = refused(stranger.handle(&registry, register("s", "guess", vec![route(8080, "b")])));
        assert!(msg.contains("session s is held by s@laptop"), "{msg}");
        assert!(matches!(stranger.handle(&registry, Request::Renew), Reply::Refused { .. }));
        assert!(stranger.handle(&registry, Request::Unregister).is_ok());
        assert_eq!(to(&registry, 8080, "a").as_deref(), Some("s"));
        // A stream that shows the token (the CLI after a port-forward blip) may.
        let mut again = RegisterStream::default();
        assert!(again.handle(&registry, register("s", "secret", vec![route(8080, "b")])).is_ok());
        assert_eq!(to(&registry, 8080, "b").as_deref(), Some("s"));
        // One stream, one session.
        assert!(refused(again.handle(&registry, register("t", "x", vec![route(8080, "c")]))).contains("another"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_not_heard_from_for_the_lease_is_dead() {
        let registry = Registry::new([8080], Duration::from_secs(15));
        let mut alice = RegisterStream::default();
        assert!(alice.handle(&registry, register("alice", "ta", vec![route(8080, "alice")])).is_ok());
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(alice.handle(&registry, Request::Renew).is_ok());
        }
        assert_eq!(to(&registry, 8080, "alice").as_deref(), Some("alice"), "renewed, still live");
        assert!(registry.relay_allowed("alice", "ta", 8080));
        assert!(registry.is_live("alice"));
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(to(&registry, 8080, "alice"), None, "requests fall back to the real container");
        assert!(!registry.relay_allowed("alice", "ta", 8080));
        assert!(!registry.is_live("alice"));
        assert!(refused(alice.handle(&registry, Request::Renew)).contains("register again"));
        // Its routes are free for another session.
        let mut bob = RegisterStream::default();
        assert!(bob.handle(&registry, register("bob", "tb", vec![route(8080, "alice")])).is_ok());
    }

    #[tokio::test]
    async fn unregister_removes_at_once() {
        let registry = Registry::new([8080], Duration::from_secs(15));
        let mut alice = RegisterStream::default();
        assert!(alice.handle(&registry, register("alice", "ta", vec![route(8080, "alice")])).is_ok());
        assert!(alice.handle(&registry, Request::Unregister).is_ok());
        assert_eq!(to(&registry, 8080, "alice"), None);
        assert!(!registry.relay_allowed("alice", "ta", 8080));
        assert!(!registry.is_live("alice"));
    }

    #[tokio::test]
    async fn relays_need_the_token_and_a_routed_port() {
        let registry = Registry::new([8080, 9090], Duration::from_secs(15));
        let mut alice = RegisterStream::default();
        assert!(alice.handle(&registry, register("alice", "ta", vec![route(8080, "alice")])).is_ok());
        assert!(registry.relay_allowed("alice", "ta", 8080));
        assert!(!registry.relay_allowed("alice", "wrong", 8080));
        assert!(!registry.relay_allowed("alice", "ta", 9090));
        assert!(!registry.relay_allowed("bob", "ta", 8080));
    }

    fn mirror(port: u16, filter: Filter) -> Route {
        Route { port, filter, mirror: Some(Mirror { body_limit: 64 }) }
    }

    fn traffic(reply: Reply) -> Traffic {
        match reply {
            Reply::Ok { traffic } => traffic,
            Reply::Refused { message } => panic!("refused: {message}"),
        }
    }

    #[tokio::test]
    async fn mirrors_copy_without_taking_and_never_conflict() {
        let registry = Registry::new([8080], Duration::from_secs(15));
        let (mut alice, mut bob, mut carol) =
            (RegisterStream::default(), RegisterStream::default(), RegisterStream::default());
        // Every request copied to two sessions, and some taken by a third.
        assert!(alice.handle(&registry, register("alice", "ta", vec![mirror(8080, Filter::default())])).is_ok());
        assert!(bob.handle(&registry, register("bob", "tb", vec![mirror(8080, Filter::default())])).is_ok());
        assert!(carol.handle(&registry, register("carol", "tc", vec![route(8080, "carol")])).is_ok());
        let copies = |dev: &str| {
            let found = registry.mirrors(8080, "/", |n| if n == "x-dev" { vec![dev.as_bytes()] } else { vec![] });
            found.into_iter().map(|(t, m)| (t.session, m.body_limit)).collect::<Vec<_>>()
        };
        assert_eq!(copies("carol"), [("alice".to_owned(), 64), ("bob".to_owned(), 64)]);
        assert_eq!(to(&registry, 8080, "carol").as_deref(), Some("carol"));
        assert_eq!(to(&registry, 8080, "dave"), None, "a mirror takes no request");
        assert!(registry.relay_allowed("alice", "ta", 8080), "copies travel as relays do");
    }

    #[tokio::test]
    async fn replies_tell_the_session_what_it_got() {
        let registry = Registry::new([8080, 8443], Duration::from_secs(15));
        let mut alice = RegisterStream::default();
        let mut mirroring = RegisterStream::default();
        let routes = vec![route(8080, "alice"), route(8443, "alice")];
        assert_eq!(traffic(alice.handle(&registry, register("alice", "ta", routes))), Traffic::default());
        assert!(mirroring.handle(&registry, register("m", "tm", vec![mirror(8080, Filter::default())])).is_ok());
        for _ in 0..3 {
            assert_eq!(to(&registry, 8080, "alice").as_deref(), Some("alice"));
        }
        registry.copied("m", Copied::Answered);
        registry.copied("m", Copied::Dropped);
        registry.copied("m", Copied::Dropped);
        registry.saw_tls(8443);
        let got = traffic(alice.handle(&registry, Request::Renew));
        assert_eq!(got, Traffic { last_minute: 3, mirrored: 0, dropped: 0, tls_ports: vec![8443] });
        let got = traffic(mirroring.handle(&registry, Request::Renew));
        assert_eq!(got, Traffic { last_minute: 1, mirrored: 1, dropped: 2, tls_ports: vec![] });
        // Registering again (a new home) keeps the counts.
        let again = register("alice", "ta", vec![route(8080, "alice")]);
        assert_eq!(traffic(alice.handle(&registry, again)).last_minute, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_minute_forgets_what_is_older() {
        let registry = Registry::new([8080], Duration::from_secs(600));
        let mut alice = RegisterStream::default();
        assert!(alice.handle(&registry, register("alice", "ta", vec![route(8080, "alice")])).is_ok());
        to(&registry, 8080, "alice");
        tokio::time::sleep(Duration::from_secs(30)).await;
        to(&registry, 8080, "alice");
        assert_eq!(traffic(alice.handle(&registry, Request::Renew)).last_minute, 2);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(traffic(alice.handle(&registry, Request::Renew)).last_minute, 1);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(traffic(alice.handle(&registry, Request::Renew)).last_minute, 0);
    }
}
