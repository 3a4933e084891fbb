//! The committed fuzz corpora (`fuzz/corpus/TARGET/`), replayed through
//! their targets' bodies (`ferry_tests::decoders`) on every test run: what
//! once reached new code in a decoder keeps being decoded without a panic.
//! (Fuzzing itself, with cargo-fuzz on nightly, is `scripts/fuzz.sh`.)

use ferry_tests::decoders::TARGETS;
use std::path::Path;

#[test]
fn every_committed_corpus_input_decodes_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut total = 0;
    for (name, run) in TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: an empty corpus");
        for p in &inputs {
            let data = std::fs::read(p).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{name}: {} panics", p.display());
        }
        println!("{name}: {} inputs", inputs.len());
        total += inputs.len();
    }
    println!("{total} corpus inputs replayed");
}
