//! The integration tests of `cla-core`, as one test binary: the code they share is
//! compiled and linked once for all of them instead of once per file.

mod config;
mod sharing_props;
mod table1;
