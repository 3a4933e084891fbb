//! Admission: what the authority vouches for about a node, and how it
//! withdraws it.
//!
//! A node's own advert is its word; what routing depends on is the
//! authority's. The flow:
//!
//! 1. The node writes a **request** (`ferry init` or `ferry request`),
//!    signed by its identity key: node id, Noise key, proposed jurisdiction,
//!    family, roles, contact.
//! 2. The authority checks it and signs a **certificate** (`ferry authority
//!    admit`, k of n like rulings, each key holder adding a signature): node
//!    id, jurisdiction, family, roles, capacity ceiling, not-before,
//!    not-after. The Noise key is *not* in it: the node rotates that on its
//!    own (signed by its identity key in every advert), and proves both keys
//!    in every handshake.
//! 3. The node loads `node.cert` from its key dir and puts it in every
//!    advert. Every node refuses adverts without a certificate valid under
//!    its `[authority]`, and takes jurisdiction and family from the
//!    certificate, roles as the intersection with the advert's, and capacity
//!    as the lower of the advert's and the ceiling.
//! 4. The authority can **revoke** a node (`ferry authority revoke`): a
//!    signed statement that gossips and persists like a ruling and never
//!    expires.
//!
//! Files are JSON: a readable copy of what was signed, the exact signed
//! bytes in hex, and the signatures.

use crate::authority::{Authority, Refusal, SignatureFile, fmt_time, refuse, sign_with};
use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use ferry_proto::pb;
use ferry_router::{Jurisdiction, NodeId, Roles};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Domain separation for certificate signatures.
pub const CERT_CONTEXT: &[u8] = b"ferry/cert/1";
/// Domain separation for revocation signatures.
pub const REVOCATION_CONTEXT: &[u8] = b"ferry/revocation/1";
/// Domain separation for a node's admission request.
pub const REQUEST_CONTEXT: &[u8] = b"ferry/request/1";
/// The largest certificate a node accepts, in bytes (it rides in adverts).
pub const MAX_CERT: usize = 2048;
/// The largest signed revocation a node accepts, in bytes.
pub const MAX_REVOCATION: usize = 2048;
/// File name of a node's certificate in its key dir.
pub const CERT_FILE: &str = "node.cert";
/// File name of a node's admission request in its key dir.
pub const REQUEST_FILE: &str = "node.request";
/// Longest family and contact strings, in bytes.
const MAX_TEXT: usize = 128;

/// Roles as the bit field of the wire (bit 0 entry, 1 relay, 2 exit).
pub fn roles_bits(r: Roles) -> u32 {
    u32::from(r.entry) | u32::from(r.relay) << 1 | u32::from(r.exit) << 2
}

/// The roles of a bit field.
pub fn roles_of(bits: u32) -> Roles {
    Roles {
        entry: bits & 1 != 0,
        relay: bits & 2 != 0,
        exit: bits & 4 != 0,
    }
}

// ---- Requests ---------------------------------------------------------------

/// A request as people read it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestInfo {
    /// Node id, hex.
    pub node_id: String,
    /// Noise static public key, hex.
    pub noise_key: String,
    /// Proposed jurisdiction.
    pub jurisdiction: String,
    /// Proposed operator family.
    pub family: String,
    /// Proposed roles, comma-separated.
    pub roles: String,
    /// How to reach the operator.
    pub contact: String,
}

/// A request file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFile {
    /// For people; the authority uses `request_hex`.
    pub request: RequestInfo,
    /// The signed `NodeRequest`, hex.
    pub request_hex: String,
    /// Ed25519 signature by the node's identity key, hex.
    pub signature: String,
}

/// What a node proposes about itself.
pub struct Proposal<'a> {
    /// Jurisdiction.
    pub jurisdiction: Jurisdiction,
    /// Family.
    pub family: &'a str,
    /// Roles.
    pub roles: Roles,
    /// Contact.
    pub contact: &'a str,
}

/// Writes a node's signed admission request.
pub fn make_request(keys: &crate::identity::Keys, p: &Proposal<'_>, now: u64) -> RequestFile {
    let req = pb::NodeRequest {
        node_id: keys.node_id().0.to_vec(),
        noise_key: keys.noise_public().to_vec(),
        jurisdiction: p.jurisdiction.to_string(),
        family: p.family.to_string(),
        roles: roles_bits(p.roles),
        contact: p.contact.to_string(),
        created_at_ms: now,
    }
    .encode_to_vec();
    let mut msg = REQUEST_CONTEXT.to_vec();
    msg.extend_from_slice(&req);
    let sig = keys.identity.sign(&msg);
    RequestFile {
        request: RequestInfo {
            node_id: hex::encode(keys.node_id().0),
            noise_key: hex::encode(keys.noise_public()),
            jurisdiction: p.jurisdiction.to_string(),
            family: p.family.to_string(),
            roles: p.roles.to_string(),
            contact: p.contact.to_string(),
        },
        request_hex: hex::encode(req),
        signature: hex::encode(sig.to_bytes()),
    }
}

impl RequestFile {
    /// Checks the node's signature and returns what it asks for.
    pub fn verify(&self) -> Result<pb::NodeRequest> {
        let bytes = hex::decode(&self.request_hex).context("request_hex")?;
        let req = pb::NodeRequest::decode(bytes.as_slice()).context("request body")?;
        let id: [u8; 32] = req
            .node_id
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("node id is not 32 bytes"))?;
        let vk = VerifyingKey::from_bytes(&id).map_err(|_| anyhow!("node id is not a key"))?;
        let sig = ed25519_dalek::Signature::from_slice(
            &hex::decode(&self.signature).context("signature")?,
        )
        .map_err(|_| anyhow!("malformed signature"))?;
        let mut msg = REQUEST_CONTEXT.to_vec();
        msg.extend_from_slice(&bytes);
        vk.verify(&msg, &sig).map_err(|_| {
            anyhow!("the request's signature does not verify: it was not made by the node it names")
        })?;
        Ok(req)
    }
}

// ---- Certificates -----------------------------------------------------------

/// A certificate as people read it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertInfo {
    /// Node id, hex.
    pub node_id: String,
    /// Jurisdiction.
    pub jurisdiction: String,
    /// Family.
    pub family: String,
    /// Roles, comma-separated.
    pub roles: String,
    /// Capacity ceiling, Mbit/s.
    pub capacity_max_mbps: u32,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// A landmark's location (`LAT,LON PLACE`), if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landmark: Option<String>,
}

/// A signed certificate (or revocation) file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    /// For people; nodes use `body_hex`.
    pub certificate: CertInfo,
    /// The signed `CertificateBody`, hex.
    pub body_hex: String,
    /// Authority signatures.
    pub signatures: Vec<SignatureFile>,
}

/// What the authority decides when it admits a node (and so what a
/// verified certificate vouches for).
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Jurisdiction.
    pub jurisdiction: Jurisdiction,
    /// Family.
    pub family: String,
    /// Roles.
    pub roles: Roles,
    /// Capacity ceiling, Mbit/s.
    pub capacity_max_mbps: u32,
    /// Valid from (ms).
    pub not_before_ms: u64,
    /// Valid until (ms).
    pub not_after_ms: u64,
    /// Set for a landmark: where the authority knows it is.
    pub landmark: Option<Location>,
}

/// A landmark's location, as its certificate gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Location {
    /// Degrees north, -90 to 90.
    pub latitude: f64,
    /// Degrees east, -180 to 180.
    pub longitude: f64,
    /// A place name, for people.
    pub place: String,
}

impl Location {
    /// Parses `LAT,LON` or `LAT,LON,PLACE` (degrees, WGS 84).
    pub fn parse(s: &str) -> Result<Self> {
        let mut parts = s.splitn(3, ',');
        let num = |p: Option<&str>, what: &str| -> Result<f64> {
            p.map(str::trim)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .with_context(|| format!("`{s}`: {what} is not a number (LAT,LON[,PLACE])"))
        };
        let l = Self {
            latitude: num(parts.next(), "the latitude")?,
            longitude: num(parts.next(), "the longitude")?,
            place: parts.next().unwrap_or("").trim().to_string(),
        };
        l.check()?;
        Ok(l)
    }

    fn check(&self) -> Result<()> {
        if !(-90.0..=90.0).contains(&self.latitude) || !(-180.0..=180.0).contains(&self.longitude) {
            bail!(
                "{},{} is not on Earth (latitude -90 to 90, longitude -180 to 180)",
                self.latitude,
                self.longitude
            );
        }
        if self.place.len() > MAX_TEXT {
            bail!("the place name is longer than {MAX_TEXT} bytes");
        }
        Ok(())
    }

    fn to_wire(&self) -> pb::Landmark {
        pb::Landmark {
            latitude: self.latitude,
            longitude: self.longitude,
            place: self.place.clone(),
        }
    }

    fn from_wire(l: &pb::Landmark) -> Result<Self> {
        let l = Self {
            latitude: l.latitude,
            longitude: l.longitude,
            place: l.place.clone(),
        };
        l.check()?;
        Ok(l)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.4},{:.4}", self.latitude, self.longitude)?;
        if !self.place.is_empty() {
            write!(f, " {}", self.place)?;
        }
        Ok(())
    }
}

impl Admission {
    /// These terms if they are in force at `now`; refused as
    /// `cert_not_yet_valid` or `cert_expired` otherwise.
    pub fn in_force(self, now: u64) -> Result<Self, Refusal> {
        if now < self.not_before_ms {
            return Err(refuse(
                "cert_not_yet_valid",
                format!("valid from {}", fmt_time(self.not_before_ms)),
            ));
        }
        if now >= self.not_after_ms {
            return Err(refuse(
                "cert_expired",
                format!("expired at {}", fmt_time(self.not_after_ms)),
            ));
        }
        Ok(self)
    }
}

/// A certificate body for a verified request.
pub fn certificate_body(req: &pb::NodeRequest, a: &Admission) -> Result<pb::CertificateBody> {
    if a.family.len() > MAX_TEXT {
        bail!("family is longer than {MAX_TEXT} bytes");
    }
    if a.not_after_ms <= a.not_before_ms {
        bail!("the certificate would end before it starts");
    }
    if roles_bits(a.roles) == 0 {
        bail!("a certificate grants at least one role");
    }
    if a.capacity_max_mbps == 0 {
        bail!("capacity ceiling must be at least 1 Mbit/s");
    }
    if let Some(l) = &a.landmark {
        l.check()?;
    }
    Ok(pb::CertificateBody {
        node_id: req.node_id.clone(),
        jurisdiction: a.jurisdiction.to_string(),
        family: a.family.clone(),
        roles: roles_bits(a.roles),
        capacity_max_mbps: a.capacity_max_mbps,
        not_before_ms: a.not_before_ms,
        not_after_ms: a.not_after_ms,
        landmark: a.landmark.as_ref().map(Location::to_wire),
    })
}

/// Signs a certificate body with each key.
pub fn sign_certificate(body: &pb::CertificateBody, keys: &[SigningKey]) -> pb::NodeCertificate {
    let mut c = pb::NodeCertificate {
        body: body.encode_to_vec(),
        signatures: Vec::new(),
    };
    for k in keys {
        sign_with(CERT_CONTEXT, &c.body, &mut c.signatures, k);
    }
    c
}

impl CertFile {
    /// The file form of a certificate.
    pub fn from_cert(c: &pb::NodeCertificate) -> Result<Self> {
        let b = pb::CertificateBody::decode(c.body.as_slice()).context("certificate body")?;
        Ok(Self {
            certificate: CertInfo {
                node_id: hex::encode(&b.node_id),
                jurisdiction: b.jurisdiction.clone(),
                family: b.family.clone(),
                roles: roles_of(b.roles).to_string(),
                capacity_max_mbps: b.capacity_max_mbps,
                not_before: fmt_time(b.not_before_ms),
                not_after: fmt_time(b.not_after_ms),
                landmark: b.landmark.as_ref().map(|l| match Location::from_wire(l) {
                    Ok(l) => l.to_string(),
                    Err(e) => format!("invalid: {e:#}"),
                }),
            },
            body_hex: hex::encode(&c.body),
            signatures: SignatureFile::from_wire(&c.signatures),
        })
    }

    /// The wire form.
    pub fn to_cert(&self) -> Result<pb::NodeCertificate> {
        Ok(pb::NodeCertificate {
            body: hex::decode(&self.body_hex).context("body_hex")?,
            signatures: SignatureFile::to_wire(&self.signatures)?,
        })
    }

    /// Reads a certificate file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading certificate {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("certificate {}", path.display()))
    }
}

/// What a verified certificate vouches for: the authority's terms.
pub type Cert = Admission;

impl Authority {
    /// Verifies a certificate's bytes for `node` at `now`: size,
    /// signatures (k of n), the node it names, and its validity period.
    /// Refusal kinds: `no_certificate`, `cert_oversized`, `cert_malformed`,
    /// `cert_unsigned`, `cert_unknown_key`, `cert_bad_signature`,
    /// `cert_threshold`, `cert_mismatch`, `cert_not_yet_valid`,
    /// `cert_expired`, `cert_invalid`.
    pub fn verify_cert(&self, bytes: &[u8], node: &NodeId, now: u64) -> Result<Cert, Refusal> {
        self.verify_cert_terms(bytes, node)?.in_force(now)
    }

    /// [`Authority::verify_cert`] without the validity period: what the
    /// certificate says, if the authority said it.
    pub fn verify_cert_terms(&self, bytes: &[u8], node: &NodeId) -> Result<Cert, Refusal> {
        if bytes.is_empty() {
            return Err(refuse(
                "no_certificate",
                "the advert carries no certificate",
            ));
        }
        if bytes.len() > MAX_CERT {
            return Err(refuse(
                "cert_oversized",
                format!("{} bytes, the limit is {MAX_CERT}", bytes.len()),
            ));
        }
        let c = pb::NodeCertificate::decode(bytes)
            .map_err(|e| refuse("cert_malformed", e.to_string()))?;
        self.check_signatures(CERT_CONTEXT, &c.body, &c.signatures)
            .map_err(|r| Refusal {
                kind: match r.kind {
                    "unsigned" => "cert_unsigned",
                    "unknown_key" => "cert_unknown_key",
                    "bad_signature" => "cert_bad_signature",
                    _ => "cert_threshold",
                },
                detail: r.detail,
            })?;
        let b = pb::CertificateBody::decode(c.body.as_slice())
            .map_err(|e| refuse("cert_malformed", e.to_string()))?;
        if b.node_id.as_slice() != node.0.as_slice() {
            return Err(refuse(
                "cert_mismatch",
                "the certificate names another node",
            ));
        }
        let jurisdiction = Jurisdiction::parse(&b.jurisdiction)
            .map_err(|e| refuse("cert_invalid", format!("{e:#}")))?;
        if b.family.len() > MAX_TEXT {
            return Err(refuse("cert_invalid", "family is too long"));
        }
        let landmark = b
            .landmark
            .as_ref()
            .map(Location::from_wire)
            .transpose()
            .map_err(|e| refuse("cert_invalid", format!("landmark: {e:#}")))?;
        Ok(Cert {
            landmark,
            jurisdiction,
            family: b.family,
            roles: roles_of(b.roles),
            capacity_max_mbps: b.capacity_max_mbps,
            not_before_ms: b.not_before_ms,
            not_after_ms: b.not_after_ms,
        })
    }

    /// Verifies a signed revocation (k of n). Revocations never expire.
    /// Refusal kinds: as [`Authority::check_signatures`], plus `oversized`
    /// and `malformed`.
    pub fn verify_revocation(&self, bytes: &[u8]) -> Result<(NodeId, pb::RevocationBody), Refusal> {
        if bytes.len() > MAX_REVOCATION {
            return Err(refuse(
                "oversized",
                format!("{} bytes, the limit is {MAX_REVOCATION}", bytes.len()),
            ));
        }
        let s =
            pb::SignedRevocation::decode(bytes).map_err(|e| refuse("malformed", e.to_string()))?;
        self.check_signatures(REVOCATION_CONTEXT, &s.body, &s.signatures)?;
        let b = pb::RevocationBody::decode(s.body.as_slice())
            .map_err(|e| refuse("malformed", e.to_string()))?;
        let id: [u8; 32] = b
            .node_id
            .as_slice()
            .try_into()
            .map_err(|_| refuse("malformed", "node id is not 32 bytes"))?;
        Ok((NodeId(id), b))
    }
}

/// Admits `keys` directly (no request file): for a mesh whose authority
/// key is at hand, such as `ferry demo` or a test cluster's init step.
pub fn admit(
    keys: &crate::identity::Keys,
    admission: &Admission,
    authority: &[SigningKey],
) -> Result<pb::NodeCertificate> {
    let req = make_request(
        keys,
        &Proposal {
            jurisdiction: admission.jurisdiction,
            family: &admission.family,
            roles: admission.roles,
            contact: "",
        },
        admission.not_before_ms,
    )
    .verify()?;
    Ok(sign_certificate(
        &certificate_body(&req, admission)?,
        authority,
    ))
}

/// [`admit`], writing `node.cert` into `key_dir`.
pub fn admit_into(
    key_dir: &Path,
    keys: &crate::identity::Keys,
    admission: &Admission,
    authority: &[SigningKey],
) -> Result<()> {
    let file = CertFile::from_cert(&admit(keys, admission, authority)?)?;
    let path = key_dir.join(CERT_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// This node's own certificate, as loaded from its key dir at start.
#[derive(Debug, Clone)]
pub struct OwnCert {
    /// The encoded certificate (what adverts carry).
    pub bytes: Vec<u8>,
    /// What verifying it under this node's own `[authority]` gave.
    pub verified: Result<Cert, Refusal>,
}

impl OwnCert {
    /// Loads `key_dir/node.cert` if it exists, and verifies it as peers
    /// will. A file that cannot be read or parsed is an error.
    pub fn load(key_dir: &Path, authority: &Authority, node: &NodeId) -> Result<Option<Self>> {
        let path = key_dir.join(CERT_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = CertFile::load(&path)?.to_cert()?.encode_to_vec();
        // Its dates are checked when used (`problem`).
        let verified = authority.verify_cert_terms(&bytes, node);
        Ok(Some(Self { bytes, verified }))
    }

    /// Why peers will refuse this node's adverts at `now`, if they will.
    pub fn problem(&self, now: u64) -> Option<String> {
        let valid = self.verified.clone().and_then(|c| c.in_force(now));
        valid
            .err()
            .map(|e| format!("its certificate is refused: {e}; ask the authority for a new one"))
    }
}

// ---- Revocations ------------------------------------------------------------

/// A revocation as people read it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevocationInfo {
    /// Node id, hex.
    pub node_id: String,
    /// RFC 3339.
    pub revoked_at: String,
    /// Why.
    pub reason: String,
}

/// A signed revocation file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationFile {
    /// For people; nodes use `body_hex`.
    pub revocation: RevocationInfo,
    /// The signed `RevocationBody`, hex.
    pub body_hex: String,
    /// Authority signatures.
    pub signatures: Vec<SignatureFile>,
}

impl RevocationFile {
    /// A revocation of `node`, signed with each key.
    pub fn new(node: &NodeId, reason: &str, now: u64, keys: &[SigningKey]) -> Result<Self> {
        if reason.len() > MAX_TEXT {
            bail!("reason is longer than {MAX_TEXT} bytes");
        }
        let body = pb::RevocationBody {
            node_id: node.0.to_vec(),
            revoked_at_ms: now,
            reason: reason.to_string(),
        };
        let mut s = pb::SignedRevocation {
            body: body.encode_to_vec(),
            signatures: Vec::new(),
        };
        for k in keys {
            sign_with(REVOCATION_CONTEXT, &s.body, &mut s.signatures, k);
        }
        Self::from_signed(&s)
    }

    /// The file form.
    pub fn from_signed(s: &pb::SignedRevocation) -> Result<Self> {
        let b = pb::RevocationBody::decode(s.body.as_slice()).context("revocation body")?;
        Ok(Self {
            revocation: RevocationInfo {
                node_id: hex::encode(&b.node_id),
                revoked_at: fmt_time(b.revoked_at_ms),
                reason: b.reason,
            },
            body_hex: hex::encode(&s.body),
            signatures: SignatureFile::from_wire(&s.signatures),
        })
    }

    /// The wire form.
    pub fn to_signed(&self) -> Result<pb::SignedRevocation> {
        Ok(pb::SignedRevocation {
            body: hex::decode(&self.body_hex).context("body_hex")?,
            signatures: SignatureFile::to_wire(&self.signatures)?,
        })
    }
}

/// Adds `key`'s signature to a certificate or revocation file (k of n by
/// separate key holders). Returns what kind of file it was.
pub fn cosign_file(text: &str, key: &SigningKey) -> Result<(String, &'static str)> {
    let v: serde_json::Value = serde_json::from_str(text).context("not a JSON file")?;
    if v.get("certificate").is_some() {
        let mut f: CertFile = serde_json::from_value(v).context("certificate file")?;
        let mut c = f.to_cert()?;
        crate::authority::check_readable(
            "certificate",
            &f.certificate,
            &CertFile::from_cert(&c)?.certificate,
        )?;
        sign_with(CERT_CONTEXT, &c.body, &mut c.signatures, key);
        f = CertFile::from_cert(&c)?;
        Ok((serde_json::to_string_pretty(&f)? + "\n", "certificate"))
    } else if v.get("revocation").is_some() {
        let f: RevocationFile = serde_json::from_value(v).context("revocation file")?;
        let mut s = f.to_signed()?;
        crate::authority::check_readable(
            "revocation",
            &f.revocation,
            &RevocationFile::from_signed(&s)?.revocation,
        )?;
        sign_with(REVOCATION_CONTEXT, &s.body, &mut s.signatures, key);
        let f = RevocationFile::from_signed(&s)?;
        Ok((serde_json::to_string_pretty(&f)? + "\n", "revocation"))
    } else {
        bail!("neither a certificate nor a revocation file")
    }
}

/// Parses the authority's choice of roles (`relay,exit`).
pub fn parse_role_list(s: &str) -> Result<Roles> {
    Ok(Roles::parse(&s.split(',').collect::<Vec<_>>())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keys;
    use rand::rngs::OsRng;

    fn authority(keys: &[&SigningKey], k: usize) -> Authority {
        let hexes: Vec<String> = keys
            .iter()
            .map(|s| hex::encode(s.verifying_key().as_bytes()))
            .collect();
        Authority::new(&hexes, k).unwrap()
    }

    fn admission() -> Admission {
        Admission {
            jurisdiction: Jurisdiction(*b"CH"),
            family: "op".into(),
            roles: parse_role_list("relay,exit").unwrap(),
            capacity_max_mbps: 100,
            not_before_ms: 1_000,
            not_after_ms: 10_000,
            landmark: None,
        }
    }

    #[test]
    fn a_request_is_admitted_k_of_n_and_forgeries_are_refused() {
        let node = Keys::generate();
        let req = make_request(
            &node,
            &Proposal {
                jurisdiction: Jurisdiction(*b"PK"),
                family: "op",
                roles: parse_role_list("relay").unwrap(),
                contact: "ops@example.org",
            },
            5,
        );
        let verified = req.verify().unwrap();
        // A request whose body was changed no longer verifies.
        let mut bad = RequestFile { ..req };
        bad.request_hex = hex::encode(
            pb::NodeRequest {
                jurisdiction: "CH".into(),
                ..verified.clone()
            }
            .encode_to_vec(),
        );
        assert!(bad.verify().is_err());

        let (a, b, c) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let auth = authority(&[&a, &b], 2);
        let body = certificate_body(&verified, &admission()).unwrap();
        let id = node.node_id();
        let both = sign_certificate(&body, &[a.clone(), b.clone()]).encode_to_vec();
        let cert = auth.verify_cert(&both, &id, 5_000).unwrap();
        assert_eq!(
            cert.jurisdiction,
            Jurisdiction(*b"CH"),
            "the authority decides"
        );
        assert_eq!(cert.capacity_max_mbps, 100);
        let kind =
            |bytes: &[u8], id: &NodeId, now| auth.verify_cert(bytes, id, now).unwrap_err().kind;
        // One short of the threshold.
        let one = sign_certificate(&body, std::slice::from_ref(&a)).encode_to_vec();
        assert_eq!(kind(&one, &id, 5_000), "cert_threshold");
        // Signed by a key this node does not trust.
        let stranger = sign_certificate(&body, std::slice::from_ref(&c)).encode_to_vec();
        assert_eq!(kind(&stranger, &id, 5_000), "cert_unknown_key");
        // Forged: the body changed after signing (a PK node claiming CH).
        let mut forged = pb::NodeCertificate::decode(both.as_slice()).unwrap();
        forged.body = pb::CertificateBody {
            capacity_max_mbps: 100_000,
            ..body.clone()
        }
        .encode_to_vec();
        assert_eq!(
            kind(&forged.encode_to_vec(), &id, 5_000),
            "cert_bad_signature"
        );
        // Another node's certificate.
        assert_eq!(
            kind(&both, &Keys::generate().node_id(), 5_000),
            "cert_mismatch"
        );
        assert_eq!(kind(&both, &id, 500), "cert_not_yet_valid");
        assert_eq!(kind(&both, &id, 10_000), "cert_expired");
        assert_eq!(kind(&[], &id, 5_000), "no_certificate");
        assert_eq!(kind(&[0xff; 30], &id, 5_000), "cert_malformed");
        assert_eq!(kind(&vec![0; MAX_CERT + 1], &id, 5_000), "cert_oversized");
    }

    #[test]
    fn files_round_trip_and_cosigning_reaches_the_threshold() {
        let node = Keys::generate();
        let (a, b) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let auth = authority(&[&a, &b], 2);
        let req = make_request(
            &node,
            &Proposal {
                jurisdiction: Jurisdiction(*b"CH"),
                family: "",
                roles: parse_role_list("relay").unwrap(),
                contact: "",
            },
            1,
        )
        .verify()
        .unwrap();
        let body = certificate_body(&req, &admission()).unwrap();
        let file = CertFile::from_cert(&sign_certificate(&body, std::slice::from_ref(&a))).unwrap();
        let text = serde_json::to_string_pretty(&file).unwrap();
        let (text, what) = cosign_file(&text, &b).unwrap();
        assert_eq!(what, "certificate");
        let back: CertFile = serde_json::from_str(&text).unwrap();
        assert_eq!(back.certificate.jurisdiction, "CH");
        let bytes = back.to_cert().unwrap().encode_to_vec();
        assert!(auth.verify_cert(&bytes, &node.node_id(), 2_000).is_ok());

        let rev =
            RevocationFile::new(&node.node_id(), "key lost", 7, std::slice::from_ref(&a)).unwrap();
        let wire = rev.to_signed().unwrap().encode_to_vec();
        assert_eq!(auth.verify_revocation(&wire).unwrap_err().kind, "threshold");
        let (text, what) = cosign_file(&serde_json::to_string(&rev).unwrap(), &b).unwrap();
        assert_eq!(what, "revocation");
        let rev: RevocationFile = serde_json::from_str(&text).unwrap();
        let (id, body) = auth
            .verify_revocation(&rev.to_signed().unwrap().encode_to_vec())
            .unwrap();
        assert_eq!((id, body.reason.as_str()), (node.node_id(), "key lost"));
    }

    /// A file whose readable copy was doctored (it says DE and a
    /// different reason; the signed bytes say CH and the real one) does
    /// not collect a co-signature: the key holder reads the copy.
    #[test]
    fn a_doctored_readable_copy_is_not_cosigned() {
        let node = Keys::generate();
        let (a, b) = (
            SigningKey::generate(&mut OsRng),
            SigningKey::generate(&mut OsRng),
        );
        let req = make_request(
            &node,
            &Proposal {
                jurisdiction: Jurisdiction(*b"CH"),
                family: "op",
                roles: parse_role_list("relay").unwrap(),
                contact: "",
            },
            1,
        )
        .verify()
        .unwrap();
        let body = certificate_body(&req, &admission()).unwrap();
        let mut file =
            CertFile::from_cert(&sign_certificate(&body, std::slice::from_ref(&a))).unwrap();
        file.certificate.jurisdiction = "DE".into();
        let e = cosign_file(&serde_json::to_string(&file).unwrap(), &b).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("does not match body_hex") && e.contains("jurisdiction"),
            "{e}"
        );
        let mut rev =
            RevocationFile::new(&node.node_id(), "key lost", 7, std::slice::from_ref(&a)).unwrap();
        rev.revocation.reason = "routine".into();
        let e = cosign_file(&serde_json::to_string(&rev).unwrap(), &b).unwrap_err();
        assert!(format!("{e:#}").contains("reason"), "{e:#}");
    }
}
