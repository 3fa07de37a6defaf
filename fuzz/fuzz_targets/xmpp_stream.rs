//! Fuzz target `xmpp_stream` (docs/fuzzing.md): the property is `stoa_fuzz::xmpp_stream`. An
//! XMPP connection carries bytes, so every input is used, UTF-8 or not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stoa_fuzz::xmpp_stream(data);
});
