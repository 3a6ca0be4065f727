//! `cla`: the command-line front end of the cla engine.

fn main() {
    println!("cla {}", env!("CARGO_PKG_VERSION"));
}
