//! What the Vulkan driver made of each kernel: registers per thread, workgroup memory and
//! whatever else the driver reports through `VK_KHR_pipeline_executable_properties`.
//!
//! wgpu does not expose these figures, yet they decide a kernel's occupancy (how many
//! workgroups share a compute unit), which often decides its speed. This tool compiles WGSL
//! files the way wgpu does for this crate's kernels (naga to SPIR-V, runtime checks off) and
//! builds each one as a compute pipeline directly through Vulkan, asking for its statistics.
//!
//! Usage: `kernel_stats [--device NAME] [--json] [--ir DIR] PATH...`, where each PATH is a `.wgsl` file or
//! a directory of them, such as the one `gpu_bench --dump-kernels DIR` writes (the generated
//! source of every kernel variant the benchmark built). `--device` picks the Vulkan device
//! whose name contains NAME (default: the first one that is not a CPU). With `--json` each
//! kernel is one line of JSON. With `--ir DIR` the driver's internal representations of each
//! kernel (whatever it offers: compiler IR or machine code) are written to
//! `DIR/KERNEL.NAME.txt`.
//!
//! Statistics are the driver's own names and units (the NVIDIA driver reports e.g.
//! "Register Count"; Mesa's drivers report their compiler's counts). A driver without the
//! extension is reported as such.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

use ash::vk;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;
/// A kernel's statistics (name, value) and internal representations (name, text).
type Stats = (Vec<(String, String)>, Vec<(String, String)>);

struct Args {
    device: Option<String>,
    json: bool,
    ir: Option<PathBuf>,
    files: Vec<PathBuf>,
}

fn parse_args() -> Res<Args> {
    let (mut device, mut json, mut ir, mut paths) = (None, false, None, Vec::new());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device" => device = Some(it.next().ok_or("--device needs a name")?),
            "--json" => json = true,
            "--ir" => ir = Some(PathBuf::from(it.next().ok_or("--ir needs a directory")?)),
            "-h" | "--help" => {
                println!(
                    "usage: kernel_stats [--device NAME] [--json] [--ir DIR] FILE.wgsl|DIR ..."
                );
                std::process::exit(0);
            }
            _ if a.starts_with("--") => return Err(format!("unexpected argument `{a}`").into()),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    if paths.is_empty() {
        return Err("usage: kernel_stats [--device NAME] [--json] FILE.wgsl|DIR ...".into());
    }
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "wgsl"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p);
        }
    }
    Ok(Args {
        device,
        json,
        ir,
        files,
    })
}

/// One compiled kernel: its SPIR-V and the bindings (group 0) it declares.
struct Compiled {
    spirv: Vec<u32>,
    bindings: Vec<(u32, vk::DescriptorType)>,
}

/// WGSL to SPIR-V as wgpu compiles this crate's kernels: SPIR-V 1.6 for Vulkan 1.3, no
/// bounds checks, loop bounding or division checks (the kernels are built trusted), and
/// workgroup memory left to the driver's own zeroing.
fn compile(src: &str) -> Res<Compiled> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(src))?;
    let unchecked = naga::proc::BoundsCheckPolicy::Unchecked;
    let options = naga::back::spv::Options {
        lang_version: (1, 6),
        flags: naga::back::spv::WriterFlags::empty(),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: unchecked,
            buffer: unchecked,
            image_load: unchecked,
            binding_array: unchecked,
        },
        zero_initialize_workgroup_memory:
            naga::back::spv::ZeroInitializeWorkgroupMemoryMode::Native,
        force_loop_bounding: false,
        ray_query_initialization_tracking: false,
        emit_int_div_checks: false,
        ..Default::default()
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
    };
    let spirv = naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))?;
    let mut bindings = Vec::new();
    for (_, var) in module.global_variables.iter() {
        let Some(rb) = &var.binding else { continue };
        if rb.group != 0 {
            return Err(format!("binding group {} (only group 0 is supported)", rb.group).into());
        }
        let ty = match var.space {
            naga::AddressSpace::Uniform => vk::DescriptorType::UNIFORM_BUFFER,
            naga::AddressSpace::Storage { .. } => vk::DescriptorType::STORAGE_BUFFER,
            other => return Err(format!("unsupported binding space {other:?}").into()),
        };
        bindings.push((rb.binding, ty));
    }
    Ok(Compiled { spirv, bindings })
}

/// A Vulkan device opened with pipeline statistics and the features the kernels use.
struct Gpu {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    stats: ash::khr::pipeline_executable_properties::Device,
    name: String,
}

impl Gpu {
    fn open(want: Option<&str>) -> Res<Gpu> {
        // SAFETY: loading the system's Vulkan loader; every call below follows the Vulkan
        // specification's valid usage for the objects it creates and destroys.
        unsafe {
            let entry = ash::Entry::load()?;
            let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
            let instance = entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )?;
            let mut chosen = None;
            let mut seen = Vec::new();
            for pd in instance.enumerate_physical_devices()? {
                let props = instance.get_physical_device_properties(pd);
                let name = props
                    .device_name_as_c_str()
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let fits = match want {
                    Some(w) => name.to_lowercase().contains(&w.to_lowercase()),
                    None => props.device_type != vk::PhysicalDeviceType::CPU,
                };
                seen.push(name.clone());
                if fits && chosen.is_none() {
                    chosen = Some((pd, name));
                }
            }
            let Some((pd, name)) = chosen else {
                return Err(format!(
                    "no matching Vulkan device (found: {}); pick one with --device NAME",
                    seen.join(", ")
                )
                .into());
            };
            let exts = instance.enumerate_device_extension_properties(pd)?;
            let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
            if !has(ash::khr::pipeline_executable_properties::NAME) {
                return Err(format!(
                    "{name}: the driver does not offer VK_KHR_pipeline_executable_properties"
                )
                .into());
            }
            let mut names = vec![ash::khr::pipeline_executable_properties::NAME.as_ptr()];
            let coop = has(ash::khr::cooperative_matrix::NAME);
            if coop {
                names.push(ash::khr::cooperative_matrix::NAME.as_ptr());
            }
            // Every feature the driver offers of those the kernels may use.
            let mut exe = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
            let mut cm = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
            let mut v11 = vk::PhysicalDeviceVulkan11Features::default();
            let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
            let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
            let mut f2 = vk::PhysicalDeviceFeatures2::default()
                .push_next(&mut exe)
                .push_next(&mut v11)
                .push_next(&mut v12)
                .push_next(&mut v13);
            if coop {
                f2 = f2.push_next(&mut cm);
            }
            instance.get_physical_device_features2(pd, &mut f2);
            let queue = [vk::DeviceQueueCreateInfo::default()
                .queue_family_index(0)
                .queue_priorities(&[1.0])];
            let info = vk::DeviceCreateInfo::default()
                .queue_create_infos(&queue)
                .enabled_extension_names(&names)
                .push_next(&mut f2);
            let device = instance.create_device(pd, &info, None)?;
            let stats = ash::khr::pipeline_executable_properties::Device::new(&instance, &device);
            Ok(Gpu {
                _entry: entry,
                instance,
                device,
                stats,
                name,
            })
        }
    }

    /// Builds `c` as a compute pipeline and returns the driver's statistics for it, and its
    /// internal representations (name, text) when `ir`.
    fn statistics(&self, c: &Compiled, ir: bool) -> Res<Stats> {
        // SAFETY: as in `open`; every object created here is destroyed before returning.
        unsafe {
            let d = &self.device;
            let module = d.create_shader_module(
                &vk::ShaderModuleCreateInfo::default().code(&c.spirv),
                None,
            )?;
            let entries: Vec<vk::DescriptorSetLayoutBinding> = c
                .bindings
                .iter()
                .map(|&(b, ty)| {
                    vk::DescriptorSetLayoutBinding::default()
                        .binding(b)
                        .descriptor_type(ty)
                        .descriptor_count(1)
                        .stage_flags(vk::ShaderStageFlags::COMPUTE)
                })
                .collect();
            let set = d.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&entries),
                None,
            )?;
            let sets = [set];
            let layout = d.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default().set_layouts(&sets),
                None,
            )?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main");
            let info = vk::ComputePipelineCreateInfo::default()
                .flags(if ir {
                    vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR
                        | vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR
                } else {
                    vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR
                })
                .stage(stage)
                .layout(layout);
            let built = d.create_compute_pipelines(vk::PipelineCache::null(), &[info], None);
            let result = match built {
                Ok(p) => {
                    let out = self.read(p[0], ir);
                    d.destroy_pipeline(p[0], None);
                    out
                }
                Err((_, e)) => Err(format!("the driver did not build the pipeline: {e}").into()),
            };
            d.destroy_pipeline_layout(layout, None);
            d.destroy_descriptor_set_layout(set, None);
            d.destroy_shader_module(module, None);
            result
        }
    }

    /// # Safety
    /// `pipeline` must have been built by this device with `CAPTURE_STATISTICS_KHR`.
    unsafe fn read(&self, pipeline: vk::Pipeline, ir: bool) -> Res<Stats> {
        let text = |c: &[std::ffi::c_char]| {
            // SAFETY: Vulkan strings are NUL-terminated within their fixed-size arrays.
            unsafe { CStr::from_ptr(c.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        let mut out = Vec::new();
        let mut reps = Vec::new();
        // SAFETY: per the function's contract.
        unsafe {
            let exes = self.stats.get_pipeline_executable_properties(
                &vk::PipelineInfoKHR::default().pipeline(pipeline),
            )?;
            for (i, exe) in exes.iter().enumerate() {
                let info = vk::PipelineExecutableInfoKHR::default()
                    .pipeline(pipeline)
                    .executable_index(i as u32);
                let prefix = if exes.len() > 1 {
                    format!("{}: ", text(&exe.name))
                } else {
                    String::new()
                };
                for s in self.stats.get_pipeline_executable_statistics(&info)? {
                    let value = match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                            (s.value.b32 != 0).to_string()
                        }
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => s.value.u64.to_string(),
                        _ => format!("{:.3}", s.value.f64),
                    };
                    out.push((format!("{prefix}{}", text(&s.name)), value));
                }
                if ir {
                    for (name, data) in self.internal(&info)? {
                        reps.push((format!("{prefix}{name}"), data));
                    }
                }
            }
        }
        Ok((out, reps))
    }

    /// # Safety
    /// `info` must name an executable of a pipeline built by this device with
    /// `CAPTURE_INTERNAL_REPRESENTATIONS_KHR`.
    unsafe fn internal(&self, info: &vk::PipelineExecutableInfoKHR) -> Res<Vec<(String, String)>> {
        let (fp, dev) = (self.stats.fp(), self.stats.device());
        // SAFETY: the usual two-call pattern (count, then the entries with their sizes), then a
        // third call with buffers of those sizes; `n` never exceeds what `out` holds.
        let query = |n: &mut u32, out: *mut vk::PipelineExecutableInternalRepresentationKHR| unsafe {
            (fp.get_pipeline_executable_internal_representations_khr)(dev, info, n, out).result()
        };
        let mut n = 0u32;
        query(&mut n, std::ptr::null_mut())?;
        let mut reps = vec![vk::PipelineExecutableInternalRepresentationKHR::default(); n as usize];
        query(&mut n, reps.as_mut_ptr())?;
        let mut bufs: Vec<Vec<u8>> = reps.iter().map(|r| vec![0u8; r.data_size]).collect();
        for (r, b) in reps.iter_mut().zip(bufs.iter_mut()) {
            r.p_data = b.as_mut_ptr().cast();
        }
        query(&mut n, reps.as_mut_ptr())?;
        Ok(reps
            .iter()
            .zip(bufs)
            .map(|(r, b)| {
                // SAFETY: Vulkan strings are NUL-terminated within their fixed-size arrays.
                let name = unsafe { CStr::from_ptr(r.name.as_ptr()) };
                let body = if r.is_text != 0 {
                    String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
                } else {
                    b.iter().map(|x| format!("{x:02x}")).collect()
                };
                (name.to_string_lossy().into_owned(), body)
            })
            .collect())
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: nothing created from the device outlives this.
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn kernel_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let gpu = Gpu::open(args.device.as_deref())?;
    if !args.json {
        println!("device: {}", gpu.name);
    }
    let mut failed = 0;
    for f in &args.files {
        let name = kernel_name(f);
        let result = std::fs::read_to_string(f)
            .map_err(|e| format!("{}: {e}", f.display()).into())
            .and_then(|src| compile(&src))
            .and_then(|c| gpu.statistics(&c, args.ir.is_some()));
        let result = result.and_then(|(stats, reps)| {
            if let Some(dir) = &args.ir {
                std::fs::create_dir_all(dir)?;
                for (rep, body) in reps {
                    let file: String = rep
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    std::fs::write(dir.join(format!("{name}.{file}.txt")), body)?;
                }
            }
            Ok(stats)
        });
        match result {
            Ok(stats) if args.json => {
                let fields: Vec<String> = stats
                    .iter()
                    .map(|(k, v)| format!("\"{}\":\"{}\"", json_escape(k), json_escape(v)))
                    .collect();
                println!(
                    "{{\"kernel\":\"{}\",\"device\":\"{}\",{}}}",
                    json_escape(&name),
                    json_escape(&gpu.name),
                    fields.join(",")
                );
            }
            Ok(stats) => {
                let fields: Vec<String> = stats.iter().map(|(k, v)| format!("{k} {v}")).collect();
                println!("{name}: {}", fields.join(", "));
            }
            Err(e) => {
                failed += 1;
                eprintln!("{name}: {e}");
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} kernels could not be read", args.files.len()).into());
    }
    Ok(())
}
