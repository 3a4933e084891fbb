//! A node's config file: `${VAR}` interpolation, TOML, and validation
//! (with no environment, and files it names read from a scratch folder
//! only if they exist).
#![no_main]

use ferry_node::config::{FileConfig, NodeConfig, interpolate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(text) = interpolate(text, |_| None) else {
        return;
    };
    let Ok(file) = toml::from_str::<FileConfig>(&text) else {
        return;
    };
    let _ = NodeConfig::try_from(file);
});
