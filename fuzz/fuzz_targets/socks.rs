//! The SOCKS5 entry's messages (pure parsers), and the connection options
//! a client may put in its password.
#![no_main]

use ferry_node::socks::wire::{self, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A whole handshake as a client would pipeline it.
    let mut rest = data;
    match wire::greeting(rest) {
        Ok(Parsed::Done(_, n)) => rest = &rest[n..],
        _ => return,
    }
    if let Ok(Parsed::Done((_, pass), n)) = wire::userpass(rest) {
        let _ = ferry_node::routing::ConnOptions::parse(&pass);
        if let Some((_, opts)) = pass.split_once('|') {
            let _ = ferry_node::routing::ConnOptions::parse(opts);
        }
        rest = &rest[n..];
    }
    if let Ok(Parsed::Done((host, _), n)) = wire::request(rest) {
        assert!(!host.is_empty() && n <= rest.len());
    }
});
