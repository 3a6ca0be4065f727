//! How `cla` fails: exit codes and the one-line `error: ...` message.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | user error: a bad flag, file or config; the message says what to fix |
//! | 2 | internal failure: a bug in cla, or the output could not be written |
//! | 130 | interrupted by Ctrl-C (what was produced so far has been written) |
//!
//! Bad input never panics; a panic (a bug) is reported as an internal failure, without a
//! backtrace.

use cla_core::ConfigError;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;

/// Exit code of a user error.
pub const EXIT_USER: u8 = 1;
/// Exit code of an internal failure.
pub const EXIT_INTERNAL: u8 = 2;
/// Exit code after Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Why a command failed.
#[derive(Debug)]
pub enum CliError {
    /// The input was wrong; the message says what to do.
    User(String),
    /// cla itself failed.
    Internal(String),
    /// The user pressed Ctrl-C; the output so far has been written.
    Interrupted,
}

impl CliError {
    /// A user error with this message.
    pub fn user(message: impl Into<String>) -> Self {
        CliError::User(message.into())
    }

    /// The process exit code for this error.
    pub fn code(&self) -> u8 {
        match self {
            CliError::User(_) => EXIT_USER,
            CliError::Internal(_) => EXIT_INTERNAL,
            CliError::Interrupted => EXIT_INTERRUPTED,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::User(m) => f.write_str(m),
            CliError::Internal(m) => write!(f, "internal failure: {m}"),
            CliError::Interrupted => f.write_str("interrupted by Ctrl-C"),
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::User(e.to_string())
    }
}

impl From<cla_model::ModelError> for CliError {
    /// Bad files, settings and prompts are the user's to fix; a sequence or cache
    /// bookkeeping failure is a bug in cla.
    fn from(e: cla_model::ModelError) -> Self {
        use cla_model::ModelError as M;
        match e {
            M::UnknownSequence(_)
            | M::DuplicateSequence(_)
            | M::ContextExceeded { .. }
            | M::Cache(_) => CliError::Internal(e.to_string()),
            // No adapter, an unmatched --device or a feature the adapter lacks: the user
            // installs a driver or picks another device. A failing device or shader is a bug
            // (or a driver's).
            M::Gpu(ref g) => match gpu_fix(g) {
                Some(fix) => CliError::User(format!(
                    "{}; {fix}",
                    e.to_string().trim_end().trim_end_matches('.')
                )),
                None => CliError::Internal(e.to_string()),
            },
            other => CliError::User(other.to_string()),
        }
    }
}

/// What the user can do about a GPU error, or `None` when it is not theirs to fix.
fn gpu_fix(e: &cla_kernels_wgpu::GpuError) -> Option<&'static str> {
    use cla_kernels_wgpu::GpuError as G;
    match e {
        G::NoAdapter { .. } => Some(
            "install a Vulkan driver (then `cla devices` lists its adapters), or use --device cpu",
        ),
        G::InvalidSelector(_) => Some(
            "name an adapter from `cla devices` (--device gpu:INDEX or gpu:NAME), or use \
             --device cpu",
        ),
        G::NotAvailable(_) => {
            Some("pick another adapter (`cla devices` lists them), or use --device cpu")
        }
        G::InvalidFastPaths(_) => Some("fix or unset CLA_GPU_DISABLE"),
        _ => None,
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Prints `error: ...` on one line of stderr and returns the exit code.
pub fn report(error: &CliError) -> ExitCode {
    if let CliError::Interrupted = error {
        let _ = writeln!(std::io::stderr(), "interrupted");
        return ExitCode::from(error.code());
    }
    let line = error.to_string().replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "error: {line}");
    ExitCode::from(error.code())
}

/// The exit code of a command's outcome, a panic included.
pub fn exit_code(outcome: std::thread::Result<CliResult>) -> ExitCode {
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => report(&e),
        // The panic hook has printed the message.
        Err(_) => ExitCode::from(EXIT_INTERNAL),
    }
}

/// Replaces the default panic message (and backtrace hint) by one line that says a bug
/// happened and where.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(
            std::io::stderr(),
            "error: internal failure (a bug in cla): {}{place}; please report it",
            message.replace('\n', " ")
        );
    }));
}

/// Writes a command's output to stdout. A closed pipe (`cla kv | head`) is not an error.
pub fn print(text: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Internal(format!("cannot write the output: {e}"))),
    }
}

/// Handles a command-line parse failure: help and version go to stdout with code 0;
/// anything else is a user error, reported on one line with a pointer to `--help`.
pub fn clap_failure(error: clap::Error, subcommand: Option<&str>) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = print(&error.render().to_string());
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = write!(std::io::stderr(), "{}", error.render());
            ExitCode::from(EXIT_USER)
        }
        _ => {
            let rendered = error.render().to_string();
            let mut parts = Vec::new();
            for line in rendered.lines() {
                let line = line.trim();
                if line.starts_with("Usage:") || line.starts_with("For more information") {
                    break;
                }
                if !line.is_empty() {
                    parts.push(line.trim_start_matches("error:").trim().to_string());
                }
            }
            let help = match subcommand {
                Some(cmd) => format!("cla {cmd} --help"),
                None => "cla --help".to_string(),
            };
            let message = format!("{}; see `{help}`", parts.join(" "));
            report(&CliError::User(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cla_kernels_wgpu::GpuError;
    use cla_model::ModelError;

    fn from_gpu(e: GpuError) -> CliError {
        CliError::from(ModelError::Gpu(e))
    }

    #[test]
    fn gpu_errors_the_user_can_fix_exit_1_and_say_how() {
        let no_adapter = from_gpu(GpuError::NoAdapter {
            selector: "name contains \"x\"".into(),
            found: vec!["0: llvmpipe (Vulkan, Cpu)".into()],
            hint: "Install a driver.",
        });
        assert_eq!(no_adapter.code(), EXIT_USER);
        let m = no_adapter.to_string();
        assert!(m.contains("no GPU adapter matches"), "{m}");
        assert!(m.contains("install a Vulkan driver"), "{m}");
        assert!(m.contains("--device cpu"), "{m}");
        assert!(!m.contains(".;"), "{m}");
        for e in [
            GpuError::InvalidSelector("name:".into()),
            GpuError::NotAvailable("f16 storage".into()),
        ] {
            let e = from_gpu(e);
            assert_eq!(e.code(), EXIT_USER, "{e}");
            assert!(e.to_string().contains("--device cpu"), "{e}");
        }
        let bad_list = from_gpu(GpuError::InvalidFastPaths(
            "CLA_GPU_DISABLE: unknown `warp`".into(),
        ));
        assert_eq!(bad_list.code(), EXIT_USER);
        assert!(
            bad_list.to_string().contains("unset CLA_GPU_DISABLE"),
            "{bad_list}"
        );
    }

    #[test]
    fn failing_devices_are_internal_failures() {
        for e in [
            GpuError::RequestDevice {
                adapter: "a".into(),
                message: "lost".into(),
            },
            GpuError::Device("out of memory".into()),
            GpuError::InvalidArgument("shape".into()),
        ] {
            assert_eq!(from_gpu(e).code(), EXIT_INTERNAL);
        }
    }
}
