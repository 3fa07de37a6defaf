//! The browser pages built into the binary, so that they need nothing but `stoa serve`: the
//! operators' console (served by `admin::console` on the admin listener) and the chat page
//! (served by `transport::upgrade` on the client listener). This module owns the files
//! themselves (plain JavaScript modules and CSS under `src/web/`, embedded with
//! `include_bytes!`; nothing is loaded from the network) and the security headers they are
//! served with. It imports nothing of Stoa.

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// Its path under the listener's root (`/` is the page itself).
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The console's files.
pub const CONSOLE: &[Asset] = &[
    Asset { path: "/", content_type: HTML, body: include_bytes!("web/console.html") },
    Asset { path: "/console.js", content_type: JS, body: include_bytes!("web/console.js") },
    Asset { path: "/console.css", content_type: CSS, body: include_bytes!("web/console.css") },
    Asset { path: "/common.js", content_type: JS, body: include_bytes!("web/common.js") },
    Asset { path: "/favicon.svg", content_type: SVG, body: include_bytes!("web/favicon.svg") },
];

/// The chat page's files.
pub const CHAT: &[Asset] = &[
    Asset { path: "/", content_type: HTML, body: include_bytes!("web/chat.html") },
    Asset { path: "/chat.js", content_type: JS, body: include_bytes!("web/chat.js") },
    Asset { path: "/chat.css", content_type: CSS, body: include_bytes!("web/chat.css") },
    Asset { path: "/common.js", content_type: JS, body: include_bytes!("web/common.js") },
    Asset { path: "/favicon.svg", content_type: SVG, body: include_bytes!("web/favicon.svg") },
];

/// The file of `set` at `path` (`/index.html` is `/`).
pub fn find(set: &'static [Asset], path: &str) -> Option<&'static Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    set.iter().find(|a| a.path == path)
}

/// The console's Content-Security-Policy: scripts, styles and images from the listener itself
/// only (no inline script or style, no `eval`), requests to itself only, no framing.
pub const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The chat page's Content-Security-Policy: as the console's, and WebSockets to the node
/// itself and to the nodes it may resume on (`origins`: `ws://host:port` or `wss://…`).
pub fn chat_csp<'a>(origins: impl IntoIterator<Item = &'a str>) -> String {
    let mut connect = String::from("'self'");
    for o in origins {
        // Only what a CSP source may hold: a scheme, a host and a port.
        if o.bytes().all(|b| b.is_ascii_alphanumeric() || b".:/-[]".contains(&b)) {
            connect.push(' ');
            connect.push_str(o);
        }
    }
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src {connect}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// `scheme://host:port` of a client URL (`ws://10.0.0.2:7450/ws`), for [`chat_csp`].
pub fn origin_of(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "ws" && scheme != "wss" {
        return None;
    }
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    Some(&url[..scheme.len() + 3 + host.len()])
}

/// Headers every page and file is served with, beside its CSP.
pub const HEADERS: &[(&str, &str)] = &[
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_their_files_are_found_and_typed() {
        assert_eq!(find(CONSOLE, "/").unwrap().content_type, HTML);
        assert_eq!(find(CHAT, "/index.html").unwrap().content_type, HTML);
        assert_eq!(find(CHAT, "/chat.js").unwrap().content_type, JS);
        assert!(find(CHAT, "/console.js").is_none() && find(CONSOLE, "/../Cargo.toml").is_none());
        // Every module a page imports is served beside it.
        for (set, page) in [(CONSOLE, "console.js"), (CHAT, "chat.js")] {
            let text = std::str::from_utf8(find(set, &format!("/{page}")).unwrap().body).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let file = line.rsplit("'./").next().unwrap().trim_end_matches("';");
                assert!(find(set, &format!("/{file}")).is_some(), "{page} imports {file}, which is not served");
            }
        }
    }

    #[test]
    fn no_page_has_inline_script_or_style() {
        for a in CONSOLE.iter().chain(CHAT).filter(|a| a.content_type == HTML) {
            let text = std::str::from_utf8(a.body).unwrap();
            assert!(!text.contains("<script>") && !text.contains("<style") && !text.contains("style="), "{}", a.path);
            // No inline event handler (` onclick=` and the like).
            let handler = text.match_indices(" on").any(|(i, _)| {
                let name: String = text[i + 3..].chars().take_while(|c| c.is_ascii_lowercase()).collect();
                !name.is_empty() && text[i + 3 + name.len()..].starts_with('=')
            });
            assert!(!handler, "{} has an inline event handler", a.path);
            assert!(text.contains("type=\"module\" src="), "{}", a.path);
        }
    }

    #[test]
    fn chat_csp_names_the_peers_origins_only() {
        assert_eq!(origin_of("ws://10.0.0.2:7450/ws"), Some("ws://10.0.0.2:7450"));
        assert_eq!(origin_of("wss://chat.example.com/ws"), Some("wss://chat.example.com"));
        assert_eq!(origin_of("http://x/ws"), None);
        let csp = chat_csp(["ws://127.0.0.1:1", "ws://a b; script-src *"]);
        assert!(csp.contains("connect-src 'self' ws://127.0.0.1:1;"), "{csp}");
        assert!(!csp.contains("script-src *"), "{csp}");
    }
}
