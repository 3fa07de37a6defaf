//! The import graph of `src/` has no circle (docs/architecture.md, "Layers"): imports point
//! down, and a lower module calls up only through a trait it defines. `scripts/import-cycles.py`
//! prints the graph and its circles; this test runs it.

#[test]
fn the_import_graph_has_no_circle() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/import-cycles.py");
    let out = std::process::Command::new("python3").arg(&script).output().expect("running python3 scripts/import-cycles.py (needs python3)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "import circles in src/ (scripts/import-cycles.py):\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("no import circles"), "{text}");
}
