//! Which burn device the engine runs on: wgpu (WGSL on any GPU vendor, or Mesa's lavapipe on a
//! CPU), flex (burn's pure-Rust CPU backend, the fast CPU path) or CUDA (cargo feature `cuda`).
//! The engine code is the same for all three; only the `Device` differs. `auto` (the default)
//! picks a real GPU through wgpu, else CUDA when built with it, else the CPU path; Mesa's lavapipe,
//! llvmpipe and SwiftShader report themselves as CPU adapters and never count as a GPU.
//! `remote:ws://HOST:PORT` runs every tensor operation on the device a `crossdiff serve` process
//! hosts (burn's remote backend), with the data, checkpoints and outputs staying on this machine.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, DeviceKind, Tensor};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// A real GPU through wgpu, else CUDA (when built with it), else `cpu`; `CROSSDIFF_BACKEND`
    /// overrides the choice.
    #[default]
    Auto,
    Wgpu,
    /// burn's `flex` backend (multi-threaded, SIMD).
    Cpu,
    Cuda,
    /// The device a `crossdiff serve` process hosts (`remote:ws://HOST:PORT`).
    Remote(RemoteServer),
}

/// A `crossdiff serve` process as a client reaches it: its WebSocket address and the token it
/// checks (`--remote-token`, else `CROSSDIFF_REMOTE_TOKEN`).
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteServer {
    /// `ws://HOST:PORT`.
    pub url: String,
    pub token: Option<String>,
}

impl fmt::Debug for RemoteServer {
    // The token never reaches a log line or an error message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteServer")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl RemoteServer {
    /// Parses what follows `remote:` (`ws://HOST:PORT`); the token comes from
    /// `CROSSDIFF_REMOTE_TOKEN` until [`Backend::with_remote_token`] sets another.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| {
            let hint = if url.starts_with("wss://") { " (TLS is not served: use ws://)" } else { "" };
            anyhow!("--backend remote:{url}: expected remote:ws://HOST:PORT{hint}")
        })?;
        let (host, port) = rest.trim_end_matches('/').rsplit_once(':').ok_or_else(|| {
            anyhow!(
                "--backend remote:{url}: no port (expected remote:ws://HOST:PORT, the port `crossdiff serve` printed)"
            )
        })?;
        if host.is_empty() || host.contains('/') {
            bail!("--backend remote:{url}: expected remote:ws://HOST:PORT");
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => bail!("--backend remote:{url}: port \"{port}\" is not a port number (1–65535)"),
        }
        let token = std::env::var("CROSSDIFF_REMOTE_TOKEN").ok().filter(|t| !t.is_empty());
        Ok(Self { url: format!("ws://{host}:{port}"), token })
    }

    /// Connects the server's device 0 (burn's remote backend), in one line naming `flag`
    /// (`--backend`, `--devices`) on failure: a refused token, a server that is not there, another
    /// protocol version.
    pub fn connect_as(&self, flag: &str) -> Result<Device> {
        use burn::remote::{ConnectError, RemoteHost};
        let mut host = RemoteHost::websocket(&self.url);
        if let Some(t) = &self.token {
            host = host.with_credential(t.as_str());
        }
        let flag = format!("{flag} remote:{}", self.url);
        let device = Device::remote_options(&host).init().map_err(|e| match e {
            ConnectError::Unauthorized if self.token.is_none() => anyhow!(
                "{flag}: the server requires a token; pass the one `crossdiff serve` was started with (--remote-token or CROSSDIFF_REMOTE_TOKEN)"
            ),
            ConnectError::Unauthorized => anyhow!(
                "{flag}: the server refused the token (--remote-token / CROSSDIFF_REMOTE_TOKEN is not the one `crossdiff serve` was started with)"
            ),
            ConnectError::Unreachable { reason } => anyhow!(
                "{flag}: no server answers there ({}); start one with `crossdiff serve --port PORT` on that machine",
                reason.lines().next().unwrap_or_default()
            ),
            other => anyhow!("{flag}: {}", other.to_string().lines().next().unwrap_or_default()),
        })?;
        CONNECTED.lock().unwrap_or_else(|p| p.into_inner()).insert(self.url.clone());
        Ok(device)
    }

    /// Whether this process connected the server once: only then can a later failure be the
    /// server going away mid-job.
    fn was_connected(&self) -> bool {
        CONNECTED.lock().unwrap_or_else(|p| p.into_inner()).contains(&self.url)
    }

    /// Whether something still accepts connections at the server's address.
    fn answers(&self) -> bool {
        use std::net::ToSocketAddrs;
        let Some(hostport) = self.url.strip_prefix("ws://") else { return false };
        let Ok(addrs) = hostport.to_socket_addrs() else { return false };
        addrs.into_iter().any(|a| std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok())
    }
}

/// The servers this process has connected (their URLs).
static CONNECTED: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A job stopped because a server it had connected went away (one line; never re-worded).
#[derive(Debug)]
pub struct RemoteStopped(String);

impl fmt::Display for RemoteStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RemoteStopped {}

/// The `--devices` list connected (errors naming `--devices`), after refusing an entry given twice
/// — by its spelling before anything is connected, then as the same device once connected (`auto`
/// settling on the same device as `cpu`) — so nothing is written for a refused list.
pub fn connect_devices(backends: &[Backend]) -> Result<Vec<Device>> {
    if let Some((i, b)) = backends.iter().enumerate().find(|(i, b)| backends[..*i].contains(b)) {
        bail!("--devices: {b} is given twice (entry {})", i + 1);
    }
    let devices = backends.iter().map(|b| b.device_as("--devices")).collect::<Result<Vec<_>>>()?;
    if let Some(i) = (1..devices.len()).find(|&i| devices[..i].contains(&devices[i])) {
        bail!("--devices: entry {} ({}) is the same device as an earlier one", i + 1, backends[i]);
    }
    Ok(devices)
}

impl Backend {
    /// A job's error as the user should read it: on a remote backend whose server no longer
    /// answers, that is what happened (the transport's own words are "Failed to read tensor:
    /// RecvError"), with what stays and how to go on; any other error as it is.
    pub fn explain_failure(&self, e: anyhow::Error) -> anyhow::Error {
        self.explain_failure_as("--backend", e)
    }

    /// [`explain_failure`](Self::explain_failure), naming `flag` (`--devices` for an entry there).
    pub fn explain_failure_as(&self, flag: &str, e: anyhow::Error) -> anyhow::Error {
        let Self::Remote(r) = self else { return e };
        // The transport's own "channel closed" is proof enough; otherwise a probe decides (it can
        // be fooled by another server that took the address since, hence not the only test).
        let lost = format!("{e:#}").contains("RecvError") || !r.answers();
        if e.downcast_ref::<RemoteStopped>().is_some() || !r.was_connected() || !lost {
            return e;
        }
        anyhow::Error::new(RemoteStopped(format!(
            "{flag} remote:{}: the remote server stopped answering mid-job ({}); what was written so far stays (checkpoints, finished files): start the server again and re-run the same command to resume",
            r.url,
            format!("{e:#}").lines().next().unwrap_or_default()
        )))
    }
}

/// [`Backend::explain_failure`] for a job on several devices (`train --devices`): the first
/// remote one whose server no longer answers explains the error.
pub fn explain_failure_of(backends: &[Backend], e: anyhow::Error) -> anyhow::Error {
    match backends.iter().find(|b| matches!(b, Backend::Remote(r) if r.was_connected() && !r.answers())) {
        Some(b) => b.explain_failure_as("--devices", e),
        None => e,
    }
}

impl FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "wgpu" => Ok(Self::Wgpu),
            "cpu" | "flex" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ if s.starts_with("remote:") => Ok(Self::Remote(RemoteServer::parse(&s["remote:".len()..])?)),
            other => bail!(
                "--backend: unknown backend \"{other}\" (expected auto, wgpu, cpu, cuda or remote:ws://HOST:PORT)"
            ),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Remote(r) => return write!(f, "remote:{}", r.url),
        })
    }
}

impl Backend {
    /// The burn device, checked to be usable: a machine without a GPU driver gets an error that
    /// says so instead of a panic deep inside the runtime.
    pub fn device(&self) -> Result<Device> {
        self.device_as("--backend")
    }

    /// [`device`](Self::device), its errors naming `flag` (`--devices` for an entry of that list).
    pub fn device_as(&self, flag: &str) -> Result<Device> {
        let device = match self.resolve()? {
            Self::Auto => unreachable!("resolve() returns a concrete backend"),
            Self::Cpu => return Ok(Device::flex()),
            Self::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
            Self::Cuda => cuda_device()?,
            Self::Remote(r) => {
                // The connect's handshake already ran an exchange with the server's device.
                return r.connect_as(flag);
            }
        };
        probe(&device).map_err(|why| {
            anyhow!(
                "{flag} {self}: no usable device ({why}); install a Vulkan driver (on a CPU-only Linux machine: \
                 Mesa's lavapipe, package mesa-vulkan-drivers) or use --backend cpu"
            )
        })?;
        Ok(device)
    }
}

impl Backend {
    /// `auto` made concrete (`CROSSDIFF_BACKEND` first, then a real GPU, CUDA, the CPU); the
    /// others as they are.
    pub fn resolve(&self) -> Result<Backend> {
        if *self != Self::Auto {
            return Ok(self.clone());
        }
        if let Ok(v) = std::env::var("CROSSDIFF_BACKEND") {
            let b: Backend = v.parse().map_err(|e| anyhow!("CROSSDIFF_BACKEND: {e}"))?;
            if b != Self::Auto {
                return Ok(b);
            }
        }
        // Settled once per process: the app asks every frame, and probing CUDA is not free.
        static AUTO: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        Ok(AUTO
            .get_or_init(|| {
                if gpu_adapter().is_some() {
                    Self::Wgpu
                } else if cfg!(feature = "cuda") && cuda_device().is_ok_and(|d| probe(&d).is_ok()) {
                    Self::Cuda
                } else {
                    Self::Cpu
                }
            })
            .clone())
    }

    /// A remote backend with `token` (`--remote-token`) in place of `CROSSDIFF_REMOTE_TOKEN`'s.
    pub fn with_remote_token(self, token: Option<String>) -> Self {
        match (self, token) {
            (Self::Remote(r), Some(t)) => Self::Remote(RemoteServer { token: Some(t), ..r }),
            (b, _) => b,
        }
    }

    /// What a summary line says: the backend and, for wgpu, the adapter (`wgpu: NVIDIA H100 (Vulkan)`).
    pub fn describe(&self) -> String {
        match self.resolve() {
            // The adapter burn's default device settles on: a GPU before a CPU adapter, Vulkan first.
            Ok(Self::Wgpu) => match default_adapter() {
                Some((a, _)) => format!(
                    "wgpu: {} ({:?}{})",
                    a.name,
                    a.backend,
                    if a.device_type == wgpu::DeviceType::Cpu { ", a CPU adapter" } else { "" }
                ),
                None => "wgpu: no adapter".into(),
            },
            Ok(Self::Cpu) => "cpu (burn flex)".into(),
            // burn's remote backend carries tensor operations, not our WGSL kernels: the portable
            // route runs there.
            Ok(Self::Remote(r)) => format!("remote {} (portable route)", r.url),
            Ok(b) => b.to_string(),
            Err(e) => format!("{self} ({e})"),
        }
    }
}

/// The adapters wgpu sees on this machine (every graphics API).
fn adapters() -> Vec<wgpu::AdapterInfo> {
    adapters_with_limits().into_iter().map(|(info, _)| info).collect()
}

/// The adapter burn's default wgpu device settles on: a GPU before a CPU adapter, Vulkan first.
fn default_adapter() -> Option<(wgpu::AdapterInfo, wgpu::Limits)> {
    adapters_with_limits().into_iter().max_by_key(|(a, _)| {
        (
            a.device_type != wgpu::DeviceType::Cpu,
            a.backend == wgpu::Backend::Vulkan,
            a.device_type == wgpu::DeviceType::DiscreteGpu,
        )
    })
}

/// The largest buffer one tensor may occupy on `device`: the wgpu adapter's storage-binding and
/// buffer limits (Mesa's lavapipe: 128 MiB; desktop GPUs: 2–4 GiB, as cubecl's memory pages);
/// `None` where the backend states no limit (the CPU).
pub fn max_buffer_bytes(device: &burn::tensor::Device) -> Option<u64> {
    if !is_wgpu(device) {
        return None;
    }
    default_adapter().map(|(_, l)| (l.max_storage_buffer_binding_size as u64).min(l.max_buffer_size))
}

/// The adapters with their limits, asked once per process: Vulkan loaders dislike instances created
/// on several threads at once.
fn adapters_with_limits() -> Vec<(wgpu::AdapterInfo, wgpu::Limits)> {
    static ADAPTERS: std::sync::OnceLock<Vec<(wgpu::AdapterInfo, wgpu::Limits)>> = std::sync::OnceLock::new();
    ADAPTERS
        .get_or_init(|| {
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let found = std::panic::catch_unwind(|| {
                let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                    backends: wgpu::Backends::all(),
                    ..wgpu::InstanceDescriptor::new_without_display_handle()
                });
                block_on(instance.enumerate_adapters(wgpu::Backends::all()))
                    .iter()
                    .map(|a| (a.get_info(), a.limits()))
                    .collect::<Vec<_>>()
            });
            std::panic::set_hook(hook);
            found.unwrap_or_default()
        })
        .clone()
}

/// A real GPU: an adapter that is not a CPU posing as one.
pub fn gpu_adapter() -> Option<wgpu::AdapterInfo> {
    let mut gpus: Vec<_> = adapters().into_iter().filter(|a| a.device_type != wgpu::DeviceType::Cpu).collect();
    // A discrete GPU before an integrated one.
    gpus.sort_by_key(|a| a.device_type != wgpu::DeviceType::DiscreteGpu);
    gpus.into_iter().next()
}

/// Polls a future that completes without waiting (wgpu's native adapter enumeration).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
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

/// Whether the device runs CubeCL with the WGSL compiler (the wgpu backend), where the WGSL
/// kernels apply. burn's `Device` exposes its backend only through its description.
pub fn is_wgpu(device: &Device) -> bool {
    format!("{device:?}").contains("Wgpu")
}

/// Whether the device is a `crossdiff serve` server's (burn's remote backend).
pub fn is_remote(device: &Device) -> bool {
    format!("{device:?}").contains("Remote")
}

/// Whether the device is burn's CPU backend (flex), whose tensors live in host memory.
pub fn is_flex(device: &Device) -> bool {
    format!("{device:?}").contains("Flex")
}
