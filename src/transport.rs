//! Client transports. Protocol v1 runs over WebSocket ([`ws`]); XMPP will join here.

pub mod upgrade;
pub mod ws;
