//! How a cell is sealed for a link, and opened from it.
//!
//! Every frame after the handshake has one form: the 5-byte cell header
//! (circuit id and command) sealed alone, then the body, then the header's
//! tag. The header is sealed under the frame's first nonce, and its tag
//! also covers, as additional data, the frame's length and the last
//! [`TAG_LEN`] bytes before that tag (all of them, if fewer). What the body
//! is depends on the command, which only the header's opener learns:
//!
//! - **A RELAY cell's body** is a record the circuit's ends sealed to each
//!   other, ending in their tag: it crosses as they sealed it. One nonce.
//! - **Any other cell's body** (circuit builds, DESTROY, NOTICE, keepalive)
//!   is sealed with the link's session under the frame's second nonce, and
//!   its tag appended: the tag the header's covers. Two nonces, and 16
//!   bytes more than before.
//!
//! So a relay opens and seals 5 bytes of a data cell instead of 16 KiB: it
//! never decrypts payload it could not read anyway. Before, every cell was
//! sealed whole on every link, and six of a 3-hop circuit's eight AEAD
//! passes over each byte were the links'. Measured in paired rounds against
//! haproxy's 3-relay chain (`benches/README.md`), an experiment build that
//! sealed data cells' headers alone carried 0.70× haproxy's where sealing
//! the whole cell carried 0.49–0.54×.
//!
//! What a link still guarantees, against someone on its wire:
//!
//! - **Confidentiality** as before: of every header (which circuit, which
//!   command: every frame has the same form, so only its length shows) and
//!   of every body; a RELAY body is sealed end to end (AES-256-GCM under
//!   the circuit's Noise session with its exit), which no relay can open
//!   either.
//! - **Cells as units, in order:** a header's tag binds it to the frame's
//!   length and to the last 16 bytes of its body (a RELAY body's end-to-end
//!   tag), under the link's nonces. A frame dropped, replayed or reordered,
//!   a body cut or lengthened, an end-to-end tag changed, or a body moved
//!   whole (with its tag) to another frame fails at the next hop, which
//!   closes the link, as before.
//! - **What arrives:** a RELAY body's bytes before its end-to-end tag are
//!   authenticated end to end only. Changed on a wire, they pass the next
//!   hop and fail at the circuit's end, which destroys the circuit as
//!   broken (`ferry_circuits_closed_total{reason="protocol"}`); the origin
//!   moves its streams to another circuit, as for any lost circuit, and
//!   nothing changed is delivered. Before, the next hop closed the whole
//!   link, with every circuit on it. Either way, an attacker on a wire can
//!   break what crosses it, and not change what arrives.
//!
//! What it gives up: a RELAY body is the same bytes on every link of its
//! circuit, so whoever watches two of those links (the entry's first and
//! the exit's last among them), not only colluding relays, can match a
//! circuit's data cells across them byte for byte; and can then break that
//! one circuit alone, by changing a byte of its cells, where before it had
//! to break a whole link. Ferry does not defend against such an observer:
//! the threat model puts anonymity against a wide observer out of scope,
//! colluding relays could always link a circuit, and timing links it for
//! whoever sees both sides of a relay. A per-hop layer as Tor's would hide
//! the match at the cost of one pass a hop; a cheaper one (AES-CTR on the
//! body, keyed per link) measured no faster than sealing whole cells.

use crate::crypto::{self, CryptoError};
use ferry_proto::cell::{CellCmd, HEADER_LEN};
use ferry_proto::{MAX_NOISE_MESSAGE, TAG_LEN};

/// Bytes of the additional data a header's tag covers: the frame's length,
/// then up to [`TAG_LEN`] bytes.
const AAD_LEN: usize = 4 + TAG_LEN;

/// Why a cell could not be sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The link's nonces ran out.
    #[error(transparent)]
    Record(#[from] CryptoError),
    /// The cell sealed would be longer than a frame may be.
    #[error("a cell of {0} bytes is too long for a link frame")]
    TooLong(usize),
}

/// Whether `cell`'s body crosses the link as it is: a RELAY cell's.
fn relayed(cell: &[u8]) -> bool {
    cell.get(4) == Some(&(CellCmd::Relay as u8))
}

/// Bytes `cell` takes on a link, sealed (without the frame's prefix).
pub fn sealed_len(cell: &[u8]) -> usize {
    cell.len() + if relayed(cell) { TAG_LEN } else { 2 * TAG_LEN }
}

/// What a header's tag covers besides the header: the frame's length, and
/// the last [`TAG_LEN`] bytes of `rest` (the frame between the header and
/// its tag), or all of it if shorter.
fn aad(frame: usize, rest: &[u8]) -> ([u8; AAD_LEN], usize) {
    let mut aad = [0u8; AAD_LEN];
    aad[..4].copy_from_slice(&(frame as u32).to_be_bytes());
    let tail = &rest[rest.len().saturating_sub(TAG_LEN)..];
    aad[4..4 + tail.len()].copy_from_slice(tail);
    (aad, 4 + tail.len())
}

/// Seals the cell `buf[start..]` for the link, in place, and appends its
/// tags: the frame, [`sealed_len`] bytes, is then `buf[start..]`.
pub fn seal<B>(sealer: &mut crypto::Sealer, buf: &mut B, start: usize) -> Result<(), SealError>
where
    B: bytes::BufMut + AsMut<[u8]>,
{
    let cell = &buf.as_mut()[start..];
    let frame = sealed_len(cell);
    if frame > MAX_NOISE_MESSAGE {
        return Err(SealError::TooLong(cell.len()));
    }
    let used = if relayed(cell) {
        1
    } else {
        let tag = sealer.seal_ahead(1, &mut buf.as_mut()[start + HEADER_LEN..], &[])?;
        buf.put_slice(tag.as_ref());
        2
    };
    let cell = &mut buf.as_mut()[start..];
    let (head, rest) = cell.split_at_mut(HEADER_LEN);
    let (aad, n) = aad(frame, rest);
    let tag = sealer.seal_ahead(0, head, &aad[..n])?;
    buf.put_slice(tag.as_ref());
    sealer.skip(used);
    Ok(())
}

/// `cell` as one whole frame, prefix and all.
pub fn frame(sealer: &mut crypto::Sealer, cell: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::with_capacity(4 + sealed_len(cell));
    let len = sealed_len(cell);
    if len > MAX_NOISE_MESSAGE {
        return Err(SealError::TooLong(cell.len()));
    }
    super::TRANSPORT_CODEC.put_prefix(len, &mut out);
    out.extend_from_slice(cell);
    seal(sealer, &mut out, 4)?;
    Ok(out)
}

/// Opens a frame in place; returns the cell's length: the cell is
/// `frame[..len]`. The codec has bounded the frame to at least a header
/// and a tag.
pub fn open(opener: &mut crypto::Opener, frame: &mut [u8]) -> Result<usize, CryptoError> {
    if frame.len() < HEADER_LEN + TAG_LEN {
        return Err(CryptoError::BadRecord);
    }
    let end = frame.len() - TAG_LEN;
    let (aad, n) = aad(frame.len(), &frame[HEADER_LEN..end]);
    let mut head = [0u8; HEADER_LEN + TAG_LEN];
    head[..HEADER_LEN].copy_from_slice(&frame[..HEADER_LEN]);
    head[HEADER_LEN..].copy_from_slice(&frame[end..]);
    opener.open_ahead(0, &mut head, &aad[..n])?;
    let len = if relayed(&head[..HEADER_LEN]) {
        opener.skip(1);
        end
    } else {
        let body = opener.open_ahead(1, &mut frame[HEADER_LEN..end], &[])?;
        opener.skip(2);
        HEADER_LEN + body
    };
    frame[..HEADER_LEN].copy_from_slice(&head[..HEADER_LEN]);
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::TRANSPORT_CODEC;
    use bytes::BytesMut;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];

    /// A cell of `cmd` with a body of `len` bytes.
    fn cell(circ: u32, cmd: CellCmd, len: usize) -> Vec<u8> {
        let mut c = circ.to_be_bytes().to_vec();
        c.push(cmd as u8);
        c.extend((0..len).map(|i| (i * 7 + circ as usize) as u8));
        c
    }

    /// Opens every frame of `wire` in turn, as a link's reader does.
    fn read_all(wire: &[u8]) -> Result<Vec<Vec<u8>>, CryptoError> {
        let mut o = crypto::Opener::new(&KEY);
        let mut buf = BytesMut::from(wire);
        let mut cells = Vec::new();
        while let Some(mut f) = TRANSPORT_CODEC.decode(&mut buf).unwrap() {
            let n = open(&mut o, &mut f)?;
            cells.push(f[..n].to_vec());
        }
        assert!(buf.is_empty(), "a frame left unread");
        Ok(cells)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_relay_body_crosses_as_the_ends_sealed_it_and_the_rest_is_sealed() {
        let mut s = crypto::Sealer::new(&KEY);
        let relay = cell(9, CellCmd::Relay, 4096);
        let wire = frame(&mut s, &relay).unwrap();
        assert_eq!(wire.len(), 4 + relay.len() + TAG_LEN);
        assert_ne!(
            &wire[4..4 + HEADER_LEN],
            &relay[..HEADER_LEN],
            "its header is sealed"
        );
        assert_eq!(
            &wire[4 + HEADER_LEN..wire.len() - TAG_LEN],
            &relay[HEADER_LEN..]
        );
        let mut all = wire;
        let others = [
            cell(9, CellCmd::Control, 4096),
            cell(9, CellCmd::Notice, 300),
            cell(9, CellCmd::Destroy, 0),
            cell(0, CellCmd::Ping, 8),
        ];
        for c in &others {
            let wire = frame(&mut s, c).unwrap();
            assert_eq!(wire.len(), 4 + c.len() + 2 * TAG_LEN);
            assert!(
                !contains(&wire, &c[..HEADER_LEN]),
                "{:?}: its header is sealed",
                c[4]
            );
            if c.len() > HEADER_LEN + 4 {
                assert!(
                    !contains(&wire, &c[HEADER_LEN..]),
                    "{:?}: its body is sealed",
                    c[4]
                );
            }
            all.extend_from_slice(&wire);
        }
        let got = read_all(&all).unwrap();
        assert_eq!(got[0], relay);
        assert_eq!(&got[1..], &others);
    }

    #[test]
    fn the_next_hop_refuses_a_frame_moved_cut_replayed_or_retagged() {
        let mut s = crypto::Sealer::new(&KEY);
        let a = frame(&mut s, &cell(1, CellCmd::Relay, 3000)).unwrap();
        let b = frame(&mut s, &cell(2, CellCmd::Relay, 3000)).unwrap();
        let body = 4 + HEADER_LEN..a.len() - TAG_LEN;
        assert!(read_all(&[&a[..], &b[..]].concat()).is_ok());
        // b's body, its end-to-end tag with it, under a's header and tag.
        let mut moved = a.clone();
        moved[body.clone()].copy_from_slice(&b[body.clone()]);
        assert_eq!(read_all(&moved), Err(CryptoError::BadRecord));
        // The end-to-end tag changed.
        let mut retagged = a.clone();
        retagged[body.end - 1] ^= 1;
        assert_eq!(read_all(&retagged), Err(CryptoError::BadRecord));
        // Cut by a byte from the middle, the prefix fixed up: the tail the
        // header's tag covers is the same, its length is not.
        let mut cut = a.clone();
        cut.remove(body.start + 100);
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(read_all(&cut), Err(CryptoError::BadRecord));
        // Replayed, and reordered.
        assert_eq!(
            read_all(&[&a[..], &a[..]].concat()),
            Err(CryptoError::BadRecord)
        );
        assert_eq!(
            read_all(&[&b[..], &a[..]].concat()),
            Err(CryptoError::BadRecord)
        );
        // A control cell's body changed: sealed, so refused at once.
        let mut s = crypto::Sealer::new(&KEY);
        let mut ctl = frame(&mut s, &cell(1, CellCmd::Control, 200)).unwrap();
        ctl[4 + HEADER_LEN + 10] ^= 1;
        assert_eq!(read_all(&ctl), Err(CryptoError::BadRecord));
    }

    #[test]
    fn a_relay_body_byte_changed_passes_the_link_and_is_left_to_the_ends() {
        let mut s = crypto::Sealer::new(&KEY);
        let relay = cell(3, CellCmd::Relay, 3000);
        let mut wire = frame(&mut s, &relay).unwrap();
        wire[4 + HEADER_LEN + 10] ^= 1;
        let got = read_all(&wire).unwrap().remove(0);
        assert_eq!(got[..HEADER_LEN], relay[..HEADER_LEN]);
        assert_eq!(got[HEADER_LEN + 10], relay[HEADER_LEN + 10] ^ 1);
        assert_eq!(got[HEADER_LEN + 11..], relay[HEADER_LEN + 11..]);
    }

    #[test]
    fn a_short_relay_body_is_covered_whole_and_an_oversized_cell_refused() {
        let mut s = crypto::Sealer::new(&KEY);
        let short = cell(5, CellCmd::Relay, 3);
        let mut wire = frame(&mut s, &short).unwrap();
        assert_eq!(read_all(&wire).unwrap(), [short]);
        wire[4 + HEADER_LEN] ^= 1;
        assert_eq!(read_all(&wire), Err(CryptoError::BadRecord));
        let big = cell(5, CellCmd::Control, MAX_NOISE_MESSAGE - 2 * TAG_LEN);
        assert!(matches!(frame(&mut s, &big), Err(SealError::TooLong(_))));
        let fits = cell(
            5,
            CellCmd::Control,
            MAX_NOISE_MESSAGE - 2 * TAG_LEN - HEADER_LEN,
        );
        assert_eq!(frame(&mut s, &fits).unwrap().len(), 4 + MAX_NOISE_MESSAGE);
    }

    proptest! {
        /// Whatever the bytes, opening a frame returns a length within it
        /// or an error, and never panics.
        #[test]
        fn any_frame_opens_or_is_refused(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut f = frame.clone();
            if let Ok(n) = open(&mut crypto::Opener::new(&KEY), &mut f) {
                prop_assert!(n <= f.len());
            }
        }
    }
}
