// refinery embeds migrations/ when the crate compiles; without this, a migration added on
// its own (no Rust source touched) would be left out of an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
