//! Rebuild the store when a migration file changes: refinery embeds them at compile time.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
