//! Jurisdictions, named blocs, and sets of jurisdictions.

use crate::Jurisdiction;
use std::collections::BTreeMap;
use std::fmt;

/// The blocs shipped with Ferry (`router/blocs.toml`).
pub const DEFAULT_BLOCS: &str = include_str!("../blocs.toml");

/// A set of jurisdictions as a 676-bit bitmap: membership is one shift and
/// one mask, with no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct JurisdictionSet([u64; 11]);

fn index(j: Jurisdiction) -> Option<usize> {
    let [a, b] = j.0;
    (a.is_ascii_uppercase() && b.is_ascii_uppercase())
        .then(|| (a - b'A') as usize * 26 + (b - b'A') as usize)
}

impl JurisdictionSet {
    /// The empty set.
    pub const EMPTY: Self = Self([0; 11]);

    /// Adds one.
    pub fn insert(&mut self, j: Jurisdiction) {
        if let Some(i) = index(j) {
            self.0[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether `j` is in the set.
    pub fn contains(&self, j: Jurisdiction) -> bool {
        index(j).is_some_and(|i| self.0[i / 64] & (1 << (i % 64)) != 0)
    }

    /// Adds every member of `other`.
    pub fn extend(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
    }

    /// Members common to both.
    pub fn intersect(&self, other: &Self) -> Self {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0) {
            *a &= b;
        }
        out
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The members, in code order.
    pub fn iter(&self) -> impl Iterator<Item = Jurisdiction> + '_ {
        (0..676usize)
            .filter(|i| self.0[i / 64] & (1 << (i % 64)) != 0)
            .map(|i| Jurisdiction([b'A' + (i / 26) as u8, b'A' + (i % 26) as u8]))
    }
}

impl FromIterator<Jurisdiction> for JurisdictionSet {
    fn from_iter<T: IntoIterator<Item = Jurisdiction>>(iter: T) -> Self {
        let mut s = Self::EMPTY;
        for j in iter {
            s.insert(j);
        }
        s
    }
}

impl fmt::Debug for JurisdictionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// A jurisdiction or a named bloc, as rulings and constraints name them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Region {
    /// One country.
    Jurisdiction(Jurisdiction),
    /// A named bloc from the bloc table.
    Bloc(String),
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Jurisdiction(j) => write!(f, "{j}"),
            Region::Bloc(b) => f.write_str(b),
        }
    }
}

impl Region {
    /// Parses `DE` (two upper-case letters) or a bloc name (anything longer).
    /// Whether a two-letter code is a real country is the caller's check.
    pub fn parse(s: &str) -> Result<Self, crate::RouterError> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic) {
            return Ok(Region::Jurisdiction(Jurisdiction([
                b[0].to_ascii_uppercase(),
                b[1].to_ascii_uppercase(),
            ])));
        }
        if b.len() > 2 && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            return Ok(Region::Bloc(s.to_ascii_uppercase()));
        }
        Err(crate::RouterError::BadRegion(s.to_string()))
    }
}

/// The table of named blocs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blocs(BTreeMap<String, JurisdictionSet>);

impl Blocs {
    /// Parses a bloc file (`[blocs] NAME = ["CC", ...]`).
    pub fn parse(text: &str) -> Result<Self, crate::RouterError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            blocs: BTreeMap<String, Vec<String>>,
        }
        let f: File =
            toml::from_str(text).map_err(|e| crate::RouterError::BadBlocs(e.to_string()))?;
        let mut out = BTreeMap::new();
        for (name, members) in f.blocs {
            let mut set = JurisdictionSet::EMPTY;
            for m in members {
                match Region::parse(&m) {
                    Ok(Region::Jurisdiction(j)) => set.insert(j),
                    _ => {
                        return Err(crate::RouterError::BadBlocs(format!(
                            "bloc {name}: `{m}` is not a country code"
                        )));
                    }
                }
            }
            out.insert(name.to_ascii_uppercase(), set);
        }
        Ok(Self(out))
    }

    /// The blocs shipped with Ferry.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_BLOCS).expect("router/blocs.toml parses")
    }

    /// The jurisdictions a region stands for. A two-letter name that is a
    /// bloc (`EU` is reserved in ISO 3166 and names no country) is the bloc.
    pub fn resolve(&self, r: &Region) -> Result<JurisdictionSet, crate::RouterError> {
        match r {
            Region::Jurisdiction(j) => Ok(self
                .0
                .get(j.as_str())
                .copied()
                .unwrap_or_else(|| [*j].into_iter().collect())),
            Region::Bloc(b) => self
                .0
                .get(b)
                .copied()
                .ok_or_else(|| crate::RouterError::UnknownBloc(b.clone())),
        }
    }

    /// The union of several regions.
    pub fn resolve_all(&self, rs: &[Region]) -> Result<JurisdictionSet, crate::RouterError> {
        let mut s = JurisdictionSet::EMPTY;
        for r in rs {
            s.extend(&self.resolve(r)?);
        }
        Ok(s)
    }

    /// Bloc names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Jurisdiction {
        Jurisdiction([s.as_bytes()[0], s.as_bytes()[1]])
    }

    #[test]
    fn builtin_blocs_resolve() {
        let b = Blocs::builtin();
        let fe = b.resolve(&Region::Bloc("FIVE_EYES".into())).unwrap();
        assert!(fe.contains(j("NZ")) && fe.contains(j("US")) && !fe.contains(j("DE")));
        assert_eq!(
            b.resolve(&Region::Bloc("EU".into()))
                .unwrap()
                .iter()
                .count(),
            27
        );
        assert!(b.resolve(&Region::Bloc("NOPE".into())).is_err());
    }

    #[test]
    fn set_operations() {
        let s: JurisdictionSet = [j("AA"), j("ZZ"), j("PK")].into_iter().collect();
        assert!(s.contains(j("ZZ")) && s.contains(j("AA")) && !s.contains(j("PL")));
        assert_eq!(
            s.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
            ["AA", "PK", "ZZ"]
        );
        let t: JurisdictionSet = [j("PK")].into_iter().collect();
        assert_eq!(s.intersect(&t), t);
    }

    #[test]
    fn regions_parse() {
        assert_eq!(Region::parse("pk").unwrap(), Region::Jurisdiction(j("PK")));
        assert_eq!(
            Region::parse("five_eyes").unwrap(),
            Region::Bloc("FIVE_EYES".into())
        );
        assert!(Region::parse("P-K").is_err());
    }
}
