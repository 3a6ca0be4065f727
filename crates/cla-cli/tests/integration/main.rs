//! The integration tests of `cla-cli`, as one test binary: the helpers in `common` and the
//! code they call are compiled and linked once for all of them instead of once per file.

mod bad_invocations;
mod commands;
mod common;
mod conformance;
mod kv;
