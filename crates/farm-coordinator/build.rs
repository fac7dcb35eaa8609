// `sqlx::migrate!` embeds migrations/ at compile time; rebuild when a migration is added or
// changed (cargo does not track that folder on its own).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
