//! The integration tests of `cla-kv`, as one test binary: the code they share is
//! compiled and linked once for all of them instead of once per file.

mod memory;
mod model;
