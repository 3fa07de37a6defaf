//! Write a Stoa room plugin in a few lines.
//!
//! Implement [`Plugin`] (every hook has a default that lets the event through) and call
//! [`export_plugin!`] once:
//!
//! ```ignore
//! use stoa_plugin_sdk::{export_plugin, Message, Plugin, RoomCtx, Verdict};
//!
//! #[derive(Default)]
//! struct Shout;
//!
//! impl Plugin for Shout {
//!     fn on_message(&mut self, _ctx: &RoomCtx, m: &Message) -> Verdict {
//!         Verdict::Rewrite(m.body.to_uppercase())
//!     }
//! }
//!
//! export_plugin!(Shout);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is a component
//! for the WIT world `stoa:plugin/room-plugin@0.1.0` (see `wit/0.1.0/` and docs/plugins.md).
//!
//! One instance of the plugin serves one room, one call at a time, so `&mut self` is plain
//! per-room memory. It is lost when the instance is replaced (reload, fault, room moving to
//! another node): keep anything that must last in [`state_set`].

#![no_std]
extern crate alloc;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "room-plugin",
        path: "../../wit/0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_room_plugin",
        default_bindings_module: "stoa_plugin_sdk::bindings",
    });
}

use alloc::boxed::Box;
#[doc(hidden)]
pub use alloc::string::String as __String;
use alloc::string::String;
use core::cell::RefCell;

pub use bindings::stoa::plugin::host::{log, now, room_info, send, state_delete, state_get, state_set};
pub use bindings::stoa::plugin::types::{Admission, Level, Message, Occupant, RoomCtx, RoomSnapshot, Verdict};

/// A room plugin. Every hook has a default: accept, allow, do nothing.
pub trait Plugin: Default + 'static {
    /// Read the plugin's JSON config for this room (`"{}"` when none). An `Err` keeps the
    /// plugin off the room and is reported as a fault.
    fn init(&mut self, config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
    /// A message is about to be stored: accept, reject (with a reason) or rewrite it.
    fn on_message(&mut self, ctx: &RoomCtx, message: &Message) -> Verdict {
        let _ = (ctx, message);
        Verdict::Accept
    }
    /// Someone asks to join: allow or deny (with a reason).
    fn on_join(&mut self, ctx: &RoomCtx, occupant: &Occupant) -> Admission {
        let _ = (ctx, occupant);
        Admission::Allow
    }
    /// Someone left the room.
    fn on_leave(&mut self, ctx: &RoomCtx, occupant: &Occupant) {
        let _ = (ctx, occupant);
    }
    /// The room was just created with this plugin enabled.
    fn on_room_created(&mut self, ctx: &RoomCtx) {
        let _ = ctx;
    }
    /// The room's configuration changed (`config` is its public view as JSON).
    fn on_config_changed(&mut self, ctx: &RoomCtx, config: &str) {
        let _ = (ctx, config);
    }
}

/// Log at info level.
pub fn info(msg: &str) {
    log(Level::Info, msg);
}

/// Log at warn level.
pub fn warn(msg: &str) {
    log(Level::Warn, msg);
}

struct Slot(RefCell<Option<Box<dyn core::any::Any>>>);
// SAFETY: a component instance is single-threaded; the host never calls in concurrently.
unsafe impl Sync for Slot {}
static INSTANCE: Slot = Slot(RefCell::new(None));

#[doc(hidden)]
pub fn __with<P: Plugin, R>(f: impl FnOnce(&mut P) -> R) -> R {
    let mut slot = INSTANCE.0.borrow_mut();
    let boxed = slot.get_or_insert_with(|| Box::new(P::default()));
    let plugin = boxed.downcast_mut::<P>().expect("one plugin type per component");
    f(plugin)
}

#[doc(hidden)]
pub fn __init<P: Plugin>(config: String) -> Result<(), String> {
    let mut plugin = P::default();
    plugin.init(&config)?;
    *INSTANCE.0.borrow_mut() = Some(Box::new(plugin));
    Ok(())
}

/// Export `$plugin` (a type implementing [`Plugin`]) as the component's hooks.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __StoaPluginGuest;

        impl $crate::bindings::Guest for __StoaPluginGuest {
            fn init(config: $crate::__String) -> ::core::result::Result<(), $crate::__String> {
                $crate::__init::<$plugin>(config)
            }
            fn on_message(ctx: $crate::RoomCtx, message: $crate::Message) -> $crate::Verdict {
                $crate::__with::<$plugin, _>(|p| $crate::Plugin::on_message(p, &ctx, &message))
            }
            fn on_join(ctx: $crate::RoomCtx, occupant: $crate::Occupant) -> $crate::Admission {
                $crate::__with::<$plugin, _>(|p| $crate::Plugin::on_join(p, &ctx, &occupant))
            }
            fn on_leave(ctx: $crate::RoomCtx, occupant: $crate::Occupant) {
                $crate::__with::<$plugin, _>(|p| $crate::Plugin::on_leave(p, &ctx, &occupant))
            }
            fn on_room_created(ctx: $crate::RoomCtx) {
                $crate::__with::<$plugin, _>(|p| $crate::Plugin::on_room_created(p, &ctx))
            }
            fn on_config_changed(ctx: $crate::RoomCtx, config: $crate::__String) {
                $crate::__with::<$plugin, _>(|p| $crate::Plugin::on_config_changed(p, &ctx, &config))
            }
        }

        $crate::bindings::__export_room_plugin!(__StoaPluginGuest with_types_in $crate::bindings);
    };
}
