//! `cla devices`: the adapters wgpu sees, and what each one can do once opened.

use crate::failure::{self, CliError, CliResult};
use cla_kernels_wgpu::{AdapterFilter, AdapterSummary, DeviceSelector, GpuContext, GpuFeatures};
use clap::Args;
use serde::Serialize;
use std::fmt::Write as _;

const EXAMPLES: &str = "\
Examples:
  cla devices
  cla devices --json
  cla devices --no-open";

const LONG_HELP: &str = "\
Examples:
  cla devices
  cla devices --json
  cla devices --no-open

Each adapter is opened to read its features and limits (a few hundred milliseconds each);
--no-open only lists them. The index, a backend name or a name substring selects an adapter
through CLA_DEVICE (e.g. CLA_DEVICE=0, CLA_DEVICE=vulkan, CLA_DEVICE=cpu).

No adapter is not an error: the list is empty and cla says how to install a Vulkan driver
(on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1, the software
driver lavapipe).

JSON output (--json) is one object: {command: \"devices\", adapters: [{index, name, backend,
device_type, driver, features, error}]} where features is null unless the adapter was
opened: {shader_f16, subgroup, subgroup_size: [min, max], cooperative_matrix: [{m, n, k, ab,
cr}], timestamp_query, timestamp_inside_passes, max_workgroup_storage, max_invocations,
max_storage_binding, max_buffer_size, max_workgroups_per_dim, max_storage_buffers,
storage_offset_alignment}, and error says why opening failed (or null).";

const NO_ADAPTER_HINT: &str = "no GPU adapter found. To run on a GPU, install its Vulkan \
driver; on Linux without a GPU, the software driver works for testing: apt-get install \
mesa-vulkan-drivers libvulkan1 (select it with CLA_DEVICE=cpu). The CPU decoder needs none.";

/// Arguments of `cla devices`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES, after_long_help = LONG_HELP)]
pub struct DevicesArgs {
    /// Only list the adapters; do not open them to read features and limits.
    #[arg(long)]
    pub no_open: bool,

    /// Print one JSON object (keys: see --help).
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Output {
    command: &'static str,
    adapters: Vec<Adapter>,
}

#[derive(Serialize)]
struct Adapter {
    index: usize,
    name: String,
    backend: String,
    device_type: String,
    driver: String,
    features: Option<Features>,
    error: Option<String>,
}

#[derive(Serialize)]
struct Features {
    shader_f16: bool,
    subgroup: bool,
    subgroup_size: [u32; 2],
    cooperative_matrix: Vec<CoopMat>,
    timestamp_query: bool,
    timestamp_inside_passes: bool,
    max_workgroup_storage: u32,
    max_invocations: u32,
    max_storage_binding: u64,
    max_buffer_size: u64,
    max_workgroups_per_dim: u32,
    max_storage_buffers: u32,
    storage_offset_alignment: u32,
}

#[derive(Serialize)]
struct CoopMat {
    m: u32,
    n: u32,
    k: u32,
    ab: String,
    cr: String,
}

impl From<&GpuFeatures> for Features {
    fn from(f: &GpuFeatures) -> Self {
        Self {
            shader_f16: f.shader_f16,
            subgroup: f.subgroup,
            subgroup_size: [f.subgroup_size.0, f.subgroup_size.1],
            cooperative_matrix: f
                .cooperative_matrix
                .iter()
                .map(|c| CoopMat {
                    m: c.m,
                    n: c.n,
                    k: c.k,
                    ab: c.ab.clone(),
                    cr: c.cr.clone(),
                })
                .collect(),
            timestamp_query: f.timestamp_query,
            timestamp_inside_passes: f.timestamp_inside_passes,
            max_workgroup_storage: f.max_workgroup_storage,
            max_invocations: f.max_invocations,
            max_storage_binding: f.max_storage_binding,
            max_buffer_size: f.max_buffer_size,
            max_workgroups_per_dim: f.max_workgroups_per_dim,
            max_storage_buffers: f.max_storage_buffers,
            storage_offset_alignment: f.storage_offset_alignment,
        }
    }
}

/// Opens adapter `a` to read what it can do.
fn probe(a: &AdapterSummary) -> (Option<Features>, Option<String>) {
    let selector = DeviceSelector {
        filter: AdapterFilter::Index(a.index),
        ..DeviceSelector::default()
    };
    match GpuContext::new(&selector) {
        Ok(ctx) => (Some(Features::from(ctx.features())), None),
        Err(e) => {
            log::info!("cannot open adapter #{}: {e}", a.index);
            (None, Some(e.to_string()))
        }
    }
}

/// Runs `cla devices`.
pub fn run(args: &DevicesArgs) -> CliResult {
    let summaries = GpuContext::list_adapters();
    log::info!("wgpu sees {} adapter(s)", summaries.len());
    let adapters: Vec<Adapter> = summaries
        .iter()
        .map(|a| {
            let (features, error) = if args.no_open { (None, None) } else { probe(a) };
            Adapter {
                index: a.index,
                name: a.name.clone(),
                backend: format!("{:?}", a.backend),
                device_type: format!("{:?}", a.device_type),
                driver: a.driver.clone(),
                features,
                error,
            }
        })
        .collect();
    if args.json {
        let out = Output {
            command: "devices",
            adapters,
        };
        let mut s = serde_json::to_string_pretty(&out)
            .map_err(|e| CliError::Internal(format!("cannot write JSON: {e}")))?;
        s.push('\n');
        if out.adapters.is_empty() {
            eprintln!("note: {NO_ADAPTER_HINT}");
        }
        return failure::print(&s);
    }
    if adapters.is_empty() {
        return failure::print(&format!("{NO_ADAPTER_HINT}\n"));
    }
    failure::print(&render(&adapters))
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn render(adapters: &[Adapter]) -> String {
    let mut s = String::new();
    for a in adapters {
        let _ = writeln!(
            s,
            "#{} {}\n    backend {}, type {}, driver {}",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            if a.driver.is_empty() { "-" } else { &a.driver }
        );
        if let Some(f) = &a.features {
            let coop = if f.cooperative_matrix.is_empty() {
                "no".to_string()
            } else {
                f.cooperative_matrix
                    .iter()
                    .map(|c| format!("{}x{}x{} {}->{}", c.m, c.n, c.k, c.ab, c.cr))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "    features: f16 {}, subgroups {} (size {}..{}), timestamps {}, cooperative \
                 matrix {}",
                yes_no(f.shader_f16),
                yes_no(f.subgroup),
                f.subgroup_size[0],
                f.subgroup_size[1],
                yes_no(f.timestamp_query),
                coop
            );
            let _ = writeln!(
                s,
                "    limits: buffer {} B, storage binding {} B, workgroup memory {} B, {} \
                 invocations/workgroup, {} workgroups/dim, {} storage buffers/stage",
                f.max_buffer_size,
                f.max_storage_binding,
                f.max_workgroup_storage,
                f.max_invocations,
                f.max_workgroups_per_dim,
                f.max_storage_buffers
            );
        }
        if let Some(e) = &a.error {
            let _ = writeln!(s, "    cannot be opened: {}", e.replace('\n', " "));
        }
    }
    s
}
