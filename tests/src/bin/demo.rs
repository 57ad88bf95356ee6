//! The demo (`cargo xtask demo`): not written yet in this commit.
fn main() {
    eprintln!("the demo is not built yet");
    std::process::exit(1);
}
