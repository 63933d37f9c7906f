//! Which burn device the engine runs on: wgpu (WGSL on any GPU vendor, or Mesa's lavapipe on a
//! CPU), flex (burn's pure-Rust CPU backend, the fast CPU path) or CUDA (cargo feature `cuda`).
//! The engine code is the same for all three; only the `Device` differs.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, DeviceKind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Wgpu,
    /// burn's `flex` backend (multi-threaded, SIMD).
    Cpu,
    Cuda,
}

impl FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "wgpu" => Ok(Self::Wgpu),
            "cpu" | "flex" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => bail!("--backend: unknown backend \"{other}\" (expected wgpu, cpu or cuda)"),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

impl Backend {
    /// The burn device, checked to be usable: a machine without a GPU driver gets an error that
    /// says so instead of a panic deep inside the runtime.
    pub fn device(self) -> Result<Device> {
        let device = match self {
            Self::Cpu => return Ok(Device::flex()),
            Self::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
            Self::Cuda => cuda_device()?,
        };
        probe(&device).map_err(|why| {
            anyhow!(
                "--backend {self}: no usable device ({why}); install a Vulkan driver (on a CPU-only Linux machine: \
                 Mesa's lavapipe, package mesa-vulkan-drivers) or use --backend cpu"
            )
        })?;
        Ok(device)
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!("--backend cuda: this binary was built without CUDA; rebuild with `cargo build --release --features cuda`")
}

/// Runs one tiny op; runtimes report a missing adapter by panicking, so catch that quietly.
fn probe(device: &Device) -> std::result::Result<(), String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let device = device.clone();
    let result = std::panic::catch_unwind(move || {
        Tensor::<1>::ones([4], &device).sum().try_into_scalar::<f32>().map_err(|e| format!("{e:?}"))
    });
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(v)) if v == 4.0 => Ok(()),
        Ok(Ok(v)) => Err(format!("a test sum gave {v} instead of 4")),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the runtime panicked".into())
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()),
    }
}
