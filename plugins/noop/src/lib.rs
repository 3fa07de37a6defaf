//! The smallest plugin: every hook keeps its default (accept, allow). Used by the benchmarks
//! to measure what a plugin costs by itself.
#[derive(Default)]
struct Noop;

impl stoa_plugin_sdk::Plugin for Noop {}

stoa_plugin_sdk::export_plugin!(Noop);
