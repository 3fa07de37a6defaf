//! Fuzz target `config` (docs/fuzzing.md): the property is `stoa_fuzz::config`. Frames and config
//! files are text, so input that is not UTF-8 is skipped, as a text frame that is not UTF-8
//! never reaches the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        stoa_fuzz::config(text);
    }
});
