//! Routing constraints from the three places they come from: the node
//! config (`[routing]`), a tenant (`[[tenants]]`, keyed by SOCKS5 username)
//! and the connection itself (options in the SOCKS5 password).
//!
//! Connection options are `key=value` pairs separated by `;` (or `&`), with
//! lists comma-separated, for example `exclude=PK,AE;exit_in=CA;avoid=FIVE_EYES`:
//!
//! | key | narrows? |
//! | --- | --- |
//! | `exclude` | yes: no hop in these regions (country codes or blocs) |
//! | `exit_in` (or `exit`) | yes: the exit in one of these (intersected with the entry's and tenant's) |
//! | `avoid_transit` (or `avoid`) | yes: no relay (non-exit hop) in these |
//! | `hops` | only upward: hops after the entry, at least the configured count, at most 8 |
//! | `class` | no: the traffic class is the tenant's; naming another is refused |
//!
//! A connection may only narrow what the entry and its tenant allow:
//! excludes add up, exit sets intersect, hops may rise. An option that would
//! widen — fewer hops than configured, another traffic class (which could
//! slip past a ruling scoped to the tenant's class) — is refused with a
//! reason (SOCKS reply 0x02). The `[routing]` relaxations (`allow_unknown`,
//! `allow_same_jurisdiction`, `allow_same_family`) are the entry's alone:
//! they hold for every tenant and connection, and nothing a client sends
//! changes them.

use anyhow::{Result, anyhow, bail};
use ferry_router::{Blocs, Constraints, Region, Resolved};
use std::collections::HashMap;

/// The builtin bloc table (EU, EEA, FIVE_EYES, FOURTEEN_EYES, GCC).
pub fn blocs() -> &'static Blocs {
    static BLOCS: std::sync::OnceLock<Blocs> = std::sync::OnceLock::new();
    BLOCS.get_or_init(Blocs::builtin)
}

/// Parses a list of regions: ISO 3166-1 alpha-2 codes or bloc names.
pub fn parse_regions<S: AsRef<str>>(items: &[S]) -> Result<Vec<Region>> {
    items
        .iter()
        .map(|s| {
            let s = s.as_ref().trim();
            let r = Region::parse(s).map_err(|e| anyhow!("{e}"))?;
            match &r {
                // `EU` is two letters and a bloc: the router resolves it.
                Region::Jurisdiction(_) if blocs().names().any(|b| b.eq_ignore_ascii_case(s)) => {}
                Region::Jurisdiction(_) => {
                    ferry_router::Jurisdiction::parse(s)?;
                }
                Region::Bloc(_) => {
                    blocs().resolve(&r).map_err(|_| {
                        anyhow!(
                            "`{s}` is neither a country code nor a known bloc ({})",
                            blocs().names().collect::<Vec<_>>().join(", ")
                        )
                    })?;
                }
            }
            Ok(r)
        })
        .collect()
}

/// A tenant: its traffic class, constraints and credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenant {
    /// Traffic class (rulings may be scoped to classes).
    pub class: String,
    /// Its constraints.
    pub constraints: Constraints,
    /// Argon2id hash of its password (PHC string), if it has one.
    pub password_hash: Option<String>,
    /// SHA-256 of its bearer token, if it has one.
    pub token_hash: Option<[u8; 32]>,
}

impl Tenant {
    /// Whether it has a password or a token.
    pub fn has_credentials(&self) -> bool {
        self.password_hash.is_some() || self.token_hash.is_some()
    }
}

/// What one SOCKS5 connection asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnOptions {
    /// Its constraints.
    pub constraints: Constraints,
    /// Its traffic class, if it names one.
    pub class: Option<String>,
}

impl ConnOptions {
    /// Parses the options text (the SOCKS5 password).
    pub fn parse(text: &str) -> Result<Self> {
        let mut o = ConnOptions::default();
        for (n, pair) in text
            .split([';', '&'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            // Text that is not a known option is never quoted back: it may
            // be a password sent in the wrong place, and refusals are logged.
            let n = n + 1;
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("option {n} is not key=value"))?;
            let list: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let c = &mut o.constraints;
            match k.trim() {
                "exclude" => c.exclude.extend(parse_regions(&list)?),
                "exit_in" | "exit" => c.exit_in.extend(parse_regions(&list)?),
                "avoid_transit" | "avoid" => c.avoid_transit.extend(parse_regions(&list)?),
                "hops" => {
                    let h: usize = v
                        .trim()
                        .parse()
                        .map_err(|_| anyhow!("hops = `{v}` is not a number"))?;
                    if !(1..=ferry_circuit::MAX_HOPS).contains(&h) {
                        bail!("hops = {h}: must be 1 to {}", ferry_circuit::MAX_HOPS);
                    }
                    c.hops = Some(h);
                }
                "class" => {
                    let v = v.trim();
                    if v.is_empty() || v.len() > 64 {
                        bail!("class must be 1 to 64 characters");
                    }
                    o.class = Some(v.to_string());
                }
                _ => bail!(
                    "option {n} has an unknown key (known: exclude, exit_in, avoid_transit, hops, class)"
                ),
            }
        }
        Ok(o)
    }
}

/// The routing policy of an entry: node constraints and tenants.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `[routing]`: applies to every circuit.
    pub node: Constraints,
    /// `[[tenants]]` by name.
    pub tenants: HashMap<String, Tenant>,
    /// Default hops (`circuit.hops`).
    pub hops: usize,
    /// The class anonymous clients get, if they are served (`None`: the
    /// entry requires a tenant's credentials).
    pub anonymous: Option<String>,
}

/// A connection's resolved routing: constraints and traffic scope.
#[derive(Clone, Debug)]
pub struct Route {
    /// Resolved constraints.
    pub constraints: Resolved,
    /// Its traffic scope.
    pub scope: ferry_router::TrafficScope,
    /// A key for the circuit pool: streams with equal keys share circuits.
    pub key: String,
}

impl Policy {
    /// The entry's relaxations on `c` (nothing else sets them).
    fn relax(&self, mut c: Constraints) -> Constraints {
        c.allow_unknown = self.node.allow_unknown;
        c.allow_same_jurisdiction = self.node.allow_same_jurisdiction;
        c.allow_same_family = self.node.allow_same_family;
        c
    }

    /// Whether checking `creds` means an Argon2 verification (a named
    /// tenant with a password, or an unknown name checked against the dummy
    /// hash): the expensive checks the entry bounds.
    pub fn costly(&self, creds: Option<(&str, &str)>) -> bool {
        match creds {
            Some((user, _)) if !user.is_empty() && user != "-" => {
                self.decoy().is_some() && self.tenants.get(user).is_none_or(|t| t.has_credentials())
            }
            _ => false,
        }
    }

    /// The hash a named check that verifies no password (an unknown name, a
    /// token) verifies against anyway, its result thrown away, so that it
    /// costs what a password check does: a tenant's own (the least by
    /// text, the same every time). `None` when no tenant has a password:
    /// then every check is cheap.
    fn decoy(&self) -> Option<&str> {
        self.tenants
            .values()
            .filter_map(|t| t.password_hash.as_deref())
            .min()
    }

    /// Checks a bearer token (HTTP `Proxy-Authorization: Bearer`): the
    /// tenant whose `token_hash` it matches. Fast (SHA-256), every tenant's
    /// digest compared in constant time.
    pub fn authenticate_bearer(
        &self,
        token: &str,
    ) -> std::result::Result<crate::auth::Client, crate::auth::AuthRefusal> {
        use subtle::ConstantTimeEq;
        if token.len() > crate::auth::TOKEN_MAX {
            return Err(crate::auth::AuthRefusal::BadToken);
        }
        let digest = crate::auth::token_digest(token);
        let mut found = None;
        for (name, t) in &self.tenants {
            if let Some(d) = &t.token_hash
                && bool::from(digest.ct_eq(d))
            {
                found = Some(name);
            }
        }
        found
            .map(|name| crate::auth::Client {
                tenant: name.clone(),
                options: String::new(),
            })
            .ok_or(crate::auth::AuthRefusal::BadToken)
    }

    /// Checks a client's credentials (`None`: it sent none; a username of
    /// `""` or `-` is anonymous). Slow on purpose (Argon2id): call it off
    /// the async threads. See [`crate::auth`].
    pub fn authenticate(
        &self,
        creds: Option<(&str, &str)>,
    ) -> std::result::Result<crate::auth::Client, crate::auth::AuthRefusal> {
        use crate::auth::{AuthRefusal, Client, verify};
        let anonymous = |options: &str| match &self.anonymous {
            Some(_) => Ok(Client {
                tenant: String::new(),
                options: options.to_string(),
            }),
            None => Err(AuthRefusal::Anonymous),
        };
        let Some((user, pass)) = creds else {
            return anonymous("");
        };
        if user.is_empty() || user == "-" {
            return anonymous(pass);
        }
        let Some(t) = self.tenants.get(user) else {
            // As slow as a known name, so a name's existence does not show.
            if let Some(h) = self.decoy() {
                verify(pass, h);
            }
            return Err(AuthRefusal::UnknownTenant);
        };
        if !t.has_credentials() {
            return Ok(Client {
                tenant: user.to_string(),
                options: pass.to_string(),
            });
        }
        let (secret, options) = pass.rsplit_once('|').unwrap_or((pass, ""));
        let ok = || {
            Ok(Client {
                tenant: user.to_string(),
                options: options.to_string(),
            })
        };
        let token = t.token_hash.as_ref().is_some_and(|d| {
            secret.len() <= crate::auth::TOKEN_MAX && crate::auth::verify_token(secret, d)
        });
        match &t.password_hash {
            Some(hash) if verify(secret, hash) || token => ok(),
            Some(_) => Err(AuthRefusal::BadPassword),
            None => {
                // Costs what any named check costs on this entry.
                if let Some(h) = self.decoy() {
                    verify(secret, h);
                }
                if token {
                    ok()
                } else {
                    Err(AuthRefusal::BadToken)
                }
            }
        }
    }

    /// Resolves a connection: `tenant` is the checked tenant's name (empty:
    /// anonymous). Options that would widen what the entry and tenant
    /// allow are refused, with the reason.
    pub fn route(&self, tenant: &str, conn: &ConnOptions) -> Result<Route> {
        let t = if tenant.is_empty() {
            Tenant {
                class: self.anonymous.clone().unwrap_or_default(),
                ..Tenant::default()
            }
        } else {
            self.tenants
                .get(tenant)
                .cloned()
                .ok_or_else(|| anyhow!("no tenant `{tenant}` on this entry"))?
        };
        let with_tenant =
            Constraints::merge(&self.node, &self.relax(t.constraints), blocs(), self.hops)
                .map_err(|e| anyhow!("{e}"))?;
        if let Some(class) = &conn.class
            && *class != t.class
        {
            bail!(
                "class={class}: a connection may not change its traffic class (it is {})",
                if t.class.is_empty() {
                    "the default class".to_string()
                } else {
                    format!("`{}`", t.class)
                }
            );
        }
        if let Some(h) = conn.constraints.hops
            && h < with_tenant.hops
        {
            bail!(
                "hops={h}: this entry builds at least {} hops; options may only raise it",
                with_tenant.hops
            );
        }
        let conn_resolved = self
            .relax(conn.constraints.clone())
            .resolve(blocs(), with_tenant.hops)
            .map_err(|e| anyhow!("{e}"))?;
        let constraints = with_tenant.and(conn_resolved);
        let class = t.class;
        let key = format!(
            "{tenant}|{class}|{}|{}|{}{}{}",
            constraints.hops,
            constraints.describe(),
            u8::from(constraints.allow_unknown),
            u8::from(constraints.diverse_jurisdiction),
            u8::from(constraints.diverse_family),
        );
        Ok(Route {
            constraints,
            scope: ferry_router::TrafficScope {
                class,
                tenant: tenant.to_string(),
            },
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_bad_ones_are_named() {
        let o = ConnOptions::parse(
            "exclude=PK,AE; exit_in=CA&avoid=FIVE_EYES,EU;hops=2;class=enterprise",
        )
        .unwrap();
        assert_eq!(o.constraints.exclude.len(), 2);
        assert_eq!(o.constraints.exit_in.len(), 1);
        assert_eq!(o.constraints.avoid_transit.len(), 2);
        assert_eq!(o.constraints.hops, Some(2));
        assert_eq!(o.class.as_deref(), Some("enterprise"));
        assert!(ConnOptions::parse("").unwrap().constraints == Constraints::default());
        let err = |t: &str| ConnOptions::parse(t).unwrap_err().to_string();
        assert!(err("exclude=XX").contains("XX"), "{}", err("exclude=XX"));
        assert!(err("exclude=NOWHERE").contains("neither a country code nor a known bloc"));
        assert!(err("exclude=PK;colour=red").contains("option 2 has an unknown key"));
        assert!(err("hops=9").contains("1 to 8"));
        assert!(err("exclude").contains("option 1 is not key=value"));
        // A password sent where options go is never quoted back.
        for text in ["hunter2", "s3cret=x", "a=b;hunter2"] {
            assert!(!err(text).contains("hunter2") && !err(text).contains("s3cret"));
        }
    }

    #[test]
    fn tenant_and_connection_add_to_the_node() {
        let mut p = Policy {
            node: Constraints {
                exclude: parse_regions(&["AE"]).unwrap(),
                ..Default::default()
            },
            tenants: HashMap::new(),
            hops: 3,
            anonymous: Some(String::new()),
        };
        p.tenants.insert(
            "acme".into(),
            Tenant {
                class: "enterprise".into(),
                constraints: Constraints {
                    exclude: parse_regions(&["PK"]).unwrap(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let conn = ConnOptions::parse("exit_in=CA;hops=4").unwrap();
        let r = p.route("acme", &conn).unwrap();
        assert_eq!(r.scope.class, "enterprise");
        assert_eq!(r.scope.tenant, "acme");
        assert_eq!(r.constraints.hops, 4, "options may raise hops");
        let text = r.constraints.describe();
        for part in ["exclude=AE", "exclude=PK", "exit_in=CA"] {
            assert!(text.contains(part), "{text}");
        }
        let other = p.route("", &ConnOptions::default()).unwrap();
        assert_eq!(other.scope.class, "");
        assert_eq!(other.constraints.hops, 3);
        assert!(!other.constraints.describe().contains("PK"));
        assert_ne!(r.key, other.key);
        // Naming its own class changes nothing.
        let same = p
            .route("acme", &ConnOptions::parse("class=enterprise").unwrap())
            .unwrap();
        assert_eq!(same.scope.class, "enterprise");
    }

    /// A connection may only narrow: another class, or fewer hops than the
    /// entry builds, is refused with the reason.
    #[test]
    fn widening_options_are_refused_with_the_reason() {
        let mut p = Policy {
            node: Constraints::default(),
            tenants: HashMap::new(),
            hops: 3,
            anonymous: Some(String::new()),
        };
        p.tenants.insert(
            "acme".into(),
            Tenant {
                class: "enterprise".into(),
                ..Default::default()
            },
        );
        let err = |tenant: &str, opts: &str| {
            p.route(tenant, &ConnOptions::parse(opts).unwrap())
                .map(|r| r.scope.class)
                .unwrap_err()
                .to_string()
        };
        let e = err("acme", "class=consumer");
        assert!(
            e.contains("may not change its traffic class") && e.contains("`enterprise`"),
            "{e}"
        );
        let e = err("", "class=enterprise");
        assert!(e.contains("the default class"), "{e}");
        let e = err("acme", "hops=1");
        assert!(e.contains("at least 3 hops"), "{e}");
        assert_eq!(
            p.route("acme", &ConnOptions::parse("hops=3").unwrap())
                .unwrap()
                .constraints
                .hops,
            3
        );
    }

    /// Each `[routing]` relaxation allows a path that is refused without
    /// it, for anonymous clients, tenants and connections with options.
    #[test]
    fn the_relaxations_each_allow_a_path_that_is_refused_without_them() {
        use ferry_router::{
            Jurisdiction, MeshView, NodeId, NodeInfo, PathIndex, PathRequest, Roles, RulingSet,
            Time,
        };
        use rand::SeedableRng;
        let relay = Roles {
            relay: true,
            ..Roles::default()
        };
        let exit = Roles {
            exit: true,
            ..Roles::default()
        };
        let node = |i: u8, j: Option<&str>, roles: Roles, family: u32| {
            let mut n = NodeInfo::new(
                NodeId([i; 32]),
                j.map(|j| Jurisdiction::parse(j).unwrap()),
                roles,
            );
            n.family = family;
            n
        };
        // Each mesh has one 2-hop path, and it needs one relaxation.
        type Relax = fn(&mut Constraints);
        let cases: [(&str, Vec<NodeInfo>, Relax); 3] = [
            (
                "allow_unknown",
                vec![node(1, Some("DE"), relay, 1), node(2, None, exit, 2)],
                |c| c.allow_unknown = true,
            ),
            (
                "allow_same_jurisdiction",
                vec![node(1, Some("DE"), relay, 1), node(2, Some("DE"), exit, 2)],
                |c| c.allow_same_jurisdiction = true,
            ),
            (
                "allow_same_family",
                vec![node(1, Some("DE"), relay, 7), node(2, Some("CH"), exit, 7)],
                |c| c.allow_same_family = true,
            ),
        ];
        for (name, nodes, relax) in cases {
            let view = MeshView::new(nodes);
            let works = |p: &Policy, tenant: &str, opts: &str| {
                let r = p.route(tenant, &ConnOptions::parse(opts).unwrap()).unwrap();
                let index = PathIndex::build(&view, &RulingSet::new(), &r.scope, Time(0));
                let req = PathRequest {
                    origin: None,
                    exit: None,
                    avoid: Vec::new(),
                };
                let mut rng = rand::rngs::StdRng::seed_from_u64(1);
                index.pick(&r.constraints, &req, &mut rng).is_ok()
            };
            let mut p = Policy {
                node: Constraints::default(),
                tenants: HashMap::new(),
                hops: 2,
                anonymous: Some(String::new()),
            };
            p.tenants.insert("acme".into(), Tenant::default());
            assert!(!works(&p, "", ""), "{name}: a path without it");
            relax(&mut p.node);
            assert!(works(&p, "", ""), "{name}: no path with it");
            assert!(
                works(&p, "acme", "exclude=PK"),
                "{name}: lost for a tenant with options"
            );
            assert!(
                works(&p, "", "exclude=PK;hops=2"),
                "{name}: lost for an anonymous connection with options"
            );
        }
    }

    fn with_password() -> Policy {
        let mut p = Policy {
            node: Constraints::default(),
            tenants: HashMap::new(),
            hops: 3,
            anonymous: None,
        };
        p.tenants.insert(
            "acme".into(),
            Tenant {
                class: "enterprise".into(),
                password_hash: Some(crate::auth::hash_password("correct horse").unwrap()),
                ..Default::default()
            },
        );
        p
    }

    /// Unknown tenant, wrong password, right password (with and without
    /// options), anonymous refused unless allowed.
    #[test]
    fn credentials_are_checked_and_refusals_say_why() {
        use crate::auth::AuthRefusal::*;
        let mut p = with_password();
        let who = |p: &Policy, u: &str, pw: &str| p.authenticate(Some((u, pw)));
        assert_eq!(
            who(&p, "nobody", "correct horse").unwrap_err(),
            UnknownTenant
        );
        assert_eq!(who(&p, "acme", "wrong horse").unwrap_err(), BadPassword);
        assert_eq!(who(&p, "acme", "").unwrap_err(), BadPassword);
        let ok = who(&p, "acme", "correct horse").unwrap();
        assert_eq!((ok.tenant.as_str(), ok.options.as_str()), ("acme", ""));
        let ok = who(&p, "acme", "correct horse|exclude=PK;hops=4").unwrap();
        assert_eq!(ok.options, "exclude=PK;hops=4");
        assert_eq!(p.authenticate(None).unwrap_err(), Anonymous);
        assert_eq!(who(&p, "-", "exclude=PK").unwrap_err(), Anonymous);
        p.anonymous = Some("consumer".into());
        let anon = who(&p, "", "exclude=PK").unwrap();
        assert_eq!(
            (anon.tenant.as_str(), anon.options.as_str()),
            ("", "exclude=PK")
        );
        let r = p
            .route("", &ConnOptions::parse(&anon.options).unwrap())
            .unwrap();
        assert_eq!(
            r.scope.class, "consumer",
            "anonymous clients get the anonymous class"
        );
        assert!(p.route("nobody", &ConnOptions::default()).is_err());
    }

    /// A tenant's bearer token identifies it alone (HTTP Bearer) or with
    /// its name (SOCKS5, HTTP Basic); a wrong token, or another tenant's,
    /// is refused; a token check costs no Argon2 unless passwords are on
    /// the entry.
    #[test]
    fn tokens_identify_their_tenant() {
        use crate::auth::AuthRefusal::*;
        let (token, hash) = crate::auth::new_token();
        let (other, _) = crate::auth::new_token();
        assert!(
            token.starts_with("ferry_") && token.len() == 6 + 43,
            "{token}"
        );
        let mut p = with_password();
        p.tenants.insert(
            "bot".into(),
            Tenant {
                class: "batch".into(),
                token_hash: Some(crate::auth::parse_token_hash(&hash).unwrap()),
                ..Default::default()
            },
        );
        assert_eq!(p.authenticate_bearer(&token).unwrap().tenant, "bot");
        assert_eq!(p.authenticate_bearer(&other).unwrap_err(), BadToken);
        let c = p
            .authenticate(Some(("bot", &format!("{token}|exclude=PK"))))
            .unwrap();
        assert_eq!(
            (c.tenant.as_str(), c.options.as_str()),
            ("bot", "exclude=PK")
        );
        assert_eq!(p.authenticate(Some(("bot", &other))).unwrap_err(), BadToken);
        // acme's password is not bot's, nor bot's token acme's.
        assert_eq!(
            p.authenticate(Some(("bot", "correct horse"))).unwrap_err(),
            BadToken
        );
        assert_eq!(
            p.authenticate(Some(("acme", &token))).unwrap_err(),
            BadPassword
        );
        assert!(
            p.costly(Some(("bot", "x"))),
            "passwords on the entry: named checks cost alike"
        );
        p.tenants.remove("acme");
        assert!(!p.costly(Some(("bot", "x"))), "tokens alone cost no Argon2");
        assert!(!p.costly(Some(("nobody", "x"))), "nor unknown names then");
        assert_eq!(
            p.authenticate(Some(("nobody", &token))).unwrap_err(),
            UnknownTenant
        );
        let long = "x".repeat(crate::auth::TOKEN_MAX + 1);
        assert_eq!(p.authenticate_bearer(&long).unwrap_err(), BadToken);
        assert!(crate::auth::parse_token_hash("sha256:00").is_err());
        assert!(crate::auth::parse_token_hash(&hash[7..]).is_err());
    }

    /// The check costs the same whether the name exists and wherever the
    /// password differs: an unknown name is checked against a dummy hash,
    /// and Argon2 compares whole digests. (Without the dummy check an
    /// unknown name answers thousands of times faster.)
    #[test]
    fn the_checks_timing_does_not_show_where_it_failed() {
        let p = with_password();
        // Interleaved, so the machine's noise falls on all three alike.
        let cases = [
            ("acme", "Xorrect horse"),
            ("acme", "correct horsX"),
            ("nobody", "correct horse"),
        ];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..9 {
            for (i, (u, pw)) in cases.iter().enumerate() {
                let start = std::time::Instant::now();
                assert!(p.authenticate(Some((u, pw))).is_err());
                times[i].push(start.elapsed().as_secs_f64());
            }
        }
        let median = |mut t: Vec<f64>| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let m: Vec<f64> = times.into_iter().map(median).collect();
        for (what, x) in [("last character", m[1]), ("unknown name", m[2])] {
            let ratio = x / m[0];
            assert!(
                (1.0 / 3.0..3.0).contains(&ratio),
                "{what}: {x:.4}s against {:.4}s for the first character",
                m[0]
            );
        }
    }
}
