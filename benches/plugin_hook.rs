//! One `on-message` hook call: the no-op example plugin (a real wasm component under every
//! limit: epoch deadline, memory cap, host-call budget) beside the same hook as a native Rust
//! trait object, in the same run. See docs/benchmarks.md ("Plugins").
//!
//!     rustup target add wasm32-wasip2
//!     cargo bench --bench plugin_hook
//!
//! Besides criterion's estimates, the bench prints p50 / p99 / p99.9 of 200,000 timed single
//! calls of each kind (the targets are stated as percentiles).

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;
use stoa::plugin::instance::PluginInstance;
use stoa::plugin::worker::{self, Attachment, PluginHandle};
use stoa::plugin::{Lookup, Message, PluginCtx, PluginHost, PluginSettings, Verdict};
use stoa::protocol::RoomAddr;

/// The same hook as native code.
trait MessageHook {
    fn on_message(&mut self, message: &Message) -> Verdict;
}

struct NativeNoop;

impl MessageHook for NativeNoop {
    fn on_message(&mut self, message: &Message) -> Verdict {
        black_box(message);
        Verdict::Accept
    }
}

fn built_plugins() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let target = workspace.join("target");
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&workspace)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "noop", "--target-dir"])
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .expect("running cargo to build the noop plugin");
    assert!(status.success(), "building plugins/noop failed (rustup target add wasm32-wasip2?)");
    target.join("wasm32-wasip2/release")
}

fn percentiles(label: &str, mut one: impl FnMut()) {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..20_000 {
        one(); // warm-up
    }
    for _ in 0..200_000 {
        let t = Instant::now();
        one();
        h.record(t.elapsed().as_nanos() as u64).expect("in range");
    }
    println!(
        "{label:<40} p50 {:>7.3} us  p99 {:>7.3} us  p99.9 {:>7.3} us",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0
    );
}

fn bench(c: &mut Criterion) {
    let dir = built_plugins();
    let cache = std::env::temp_dir().join("stoa-bench-plugin-cache");
    let settings = PluginSettings::default();
    let host = PluginHost::new(settings.clone(), dir, cache, 16 * 1024).expect("plugin host");
    host.load("noop").expect("loading the noop plugin");
    let Lookup::Ready(loaded, _, _) = host.lookup("noop", &stoa::protocol::RoomAddr("bench@conference.localhost".into())) else { panic!("noop is loaded") };
    let room = RoomAddr("bench@conference.localhost".into());
    let mut message = Message { sender: "ann".into(), nick: "ann".into(), body: "hello, world".into(), client_msg_id: "c1".into() };

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let plugin_ctx = PluginCtx::new("noop".into(), room.clone(), &settings, 16 * 1024, None);
    let mut instance = rt.block_on(PluginInstance::start(&loaded, plugin_ctx, "{}", &settings)).expect("instantiating noop");
    let mut native: Box<dyn MessageHook> = Box::new(NativeNoop);

    let mut group = c.benchmark_group("on_message");
    group.bench_function("native trait object", |b| b.iter(|| black_box(native.on_message(&message))));
    group.bench_function("native trait object in block_on", |b| {
        b.iter(|| rt.block_on(async { black_box(native.on_message(&message)) }))
    });
    group.bench_function("wasm instance call", |b| b.iter(|| rt.block_on(instance.on_message(&mut message)).expect("no fault")));

    // The path rooms use: the worker task and its queue (two task hops per call).
    let mt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let handle: PluginHandle =
        worker::spawn(&host, "noop", "{}".into(), Attachment { room: room.clone(), store: None, link: None, io: None }, worker::Runner::Runtime(mt.handle()));
    let chain: worker::Chain = vec![handle].into();
    group.bench_function("wasm via worker queue", |b| b.iter(|| mt.block_on(PluginHandle::run_chain(&chain, message.clone()))));
    group.finish();

    println!("\nsingle-call percentiles (same run):");
    percentiles("native trait object", || {
        black_box(native.on_message(&message));
    });
    percentiles("wasm instance call", || {
        rt.block_on(instance.on_message(&mut message)).expect("no fault");
    });
    percentiles("wasm via worker queue", || {
        black_box(mt.block_on(PluginHandle::run_chain(&chain, message.clone())));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
