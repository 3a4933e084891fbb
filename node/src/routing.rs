//! Routing constraints from the three places they come from: the node
//! config (`[routing]`), a tenant (`[[tenants]]`, keyed by SOCKS5 username)
//! and the connection itself (options in the SOCKS5 password).
//!
//! Connection options are `key=value` pairs separated by `;` (or `&`), with
//! lists comma-separated, for example `exclude=PK,AE;exit_in=CA;avoid=FIVE_EYES`:
//!
//! | key | meaning |
//! | --- | --- |
//! | `exclude` | no hop in these regions (country codes or blocs) |
//! | `exit_in` (or `exit`) | the exit in one of these |
//! | `avoid_transit` (or `avoid`) | no relay (non-exit hop) in these |
//! | `hops` | hops after the entry, 1 to 8 |
//! | `class` | traffic class, for rulings scoped to classes |
//!
//! Connection and tenant add to the node's constraints: excludes add up, exit
//! sets intersect, the most specific hop count wins.

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

/// A tenant: its traffic class and constraints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenant {
    /// Traffic class (rulings may be scoped to classes).
    pub class: String,
    /// Its constraints.
    pub constraints: Constraints,
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
        for pair in text
            .split([';', '&'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("option `{pair}` is not key=value"))?;
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
                    if !(1..=8).contains(&h) {
                        bail!("hops = {h}: must be 1 to 8");
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
                other => bail!(
                    "unknown option `{other}` (known: exclude, exit_in, avoid_transit, hops, class)"
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
    /// Resolves a connection: `tenant` is the SOCKS5 username (empty: none).
    pub fn route(&self, tenant: &str, conn: &ConnOptions) -> Result<Route> {
        let t = self.tenants.get(tenant).cloned().unwrap_or_default();
        let with_tenant = Constraints::merge(&self.node, &t.constraints, blocs(), self.hops)
            .map_err(|e| anyhow!("{e}"))?;
        let conn_resolved = conn
            .constraints
            .resolve(blocs(), with_tenant.hops)
            .map_err(|e| anyhow!("{e}"))?;
        let constraints = with_tenant.and(conn_resolved);
        let class = conn.class.clone().unwrap_or(t.class);
        let key = format!(
            "{tenant}|{class}|{}|{}",
            constraints.hops,
            constraints.describe()
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
        assert!(err("colour=red").contains("unknown option `colour`"));
        assert!(err("hops=9").contains("1 to 8"));
        assert!(err("exclude").contains("not key=value"));
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
        };
        p.tenants.insert(
            "acme".into(),
            Tenant {
                class: "enterprise".into(),
                constraints: Constraints {
                    exclude: parse_regions(&["PK"]).unwrap(),
                    ..Default::default()
                },
            },
        );
        let conn = ConnOptions::parse("exit_in=CA;hops=2").unwrap();
        let r = p.route("acme", &conn).unwrap();
        assert_eq!(r.scope.class, "enterprise");
        assert_eq!(r.scope.tenant, "acme");
        assert_eq!(r.constraints.hops, 2);
        let text = r.constraints.describe();
        for part in ["exclude=AE", "exclude=PK", "exit_in=CA"] {
            assert!(text.contains(part), "{text}");
        }
        let other = p.route("", &ConnOptions::default()).unwrap();
        assert_eq!(other.scope.class, "");
        assert_eq!(other.constraints.hops, 3);
        assert!(!other.constraints.describe().contains("PK"));
        assert_ne!(r.key, other.key);
        let own_class = p
            .route("acme", &ConnOptions::parse("class=bulk").unwrap())
            .unwrap();
        assert_eq!(own_class.scope.class, "bulk");
    }
}
