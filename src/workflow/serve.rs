//! `crossdiff serve`: this machine's device as a burn remote server (WebSocket), so a laptop runs
//! cache, train, analyze, kl, steer and the app's jobs here with `--backend remote:ws://HOST:PORT`.
//! The transport, the sessions and the token check are burn's (`burn::server`); this file decides
//! who may connect and says what happens.
//!
//! Secure by default: without a token the server listens on loopback only, and binding any other
//! address needs one. burn's WebSocket carries the token unencrypted (it keeps stray clients of a
//! trusted network out): across an untrusted network, tunnel the port (`ssh -L`).

use std::collections::VecDeque;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use burn::server::telemetry::{DrainStatus, TelemetryEvent, TelemetryProbe};
use burn::server::{AuthorizationRequest, RemoteServer, TokenAuthorizer, WebSocketTransport};
use burn::tensor::Device;

/// `crossdiff serve`: host this machine's device for remote clients until Ctrl-C.
#[derive(Clone, clap::Args)]
pub struct ServeJob {
    /// TCP port to listen on (0: any free port; the first line printed names it).
    #[arg(long)]
    pub port: u16,
    /// The address to listen on. Without a token only a loopback address is allowed (this machine
    /// only; reach it from elsewhere through an SSH tunnel); 0.0.0.0 (every interface) needs one.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub bind: IpAddr,
    /// The token clients must present (`--remote-token` or CROSSDIFF_REMOTE_TOKEN on their side).
    /// It shows in the process list: prefer --token-file on a shared machine.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file whose first line is the token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for ServeJob {
    // The token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeJob")
            .field("port", &self.port)
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// What a client sees first: where to point `--backend`.
pub struct Listening {
    pub address: SocketAddr,
    pub token_required: bool,
}

impl ServeJob {
    /// The token, from the flag or the file; an empty one is refused (every client without a
    /// token presents the empty one).
    pub fn token(&self) -> Result<Option<String>> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some((t.clone(), "--token".to_string())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| anyhow!("--token-file {}: cannot read: {e}", f.display()))?;
                Some((
                    text.lines().next().unwrap_or_default().trim().to_string(),
                    format!("--token-file {}", f.display()),
                ))
            }
            (None, None) => None,
        };
        match token {
            Some((t, from)) if t.is_empty() => bail!("{from}: the token is empty"),
            Some((t, _)) => Ok(Some(t)),
            None => Ok(None),
        }
    }

    /// Checks the flags and binds the port, before anything is served: a public address without a
    /// token and a port in use are refused here, in one line.
    pub fn bind(&self) -> Result<(TcpListener, Option<String>)> {
        let token = self.token()?;
        if token.is_none() && !self.bind.is_loopback() {
            bail!(
                "--bind {}: listening beyond this machine needs a token (--token or --token-file); without one, bind a loopback address (the default, 127.0.0.1)",
                self.bind
            );
        }
        let address = SocketAddr::new(self.bind, self.port);
        let listener = TcpListener::bind(address).map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "the port is in use (another server? pick another --port, or 0 for any free one)".to_string()
                }
                std::io::ErrorKind::AddrNotAvailable => "no interface of this machine has that address".to_string(),
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (ports below 1024 need privileges)".to_string()
                }
                _ => e.to_string(),
            };
            anyhow!("--port {} --bind {}: cannot listen: {why}", self.port, self.bind)
        })?;
        Ok((listener, token))
    }

    /// Serves `device` on the listener [`bind`](Self::bind) returned until Ctrl-C or SIGTERM,
    /// logging each session to `log` (who, which device, how long) and calling `ready` once the
    /// port is known.
    pub fn serve(
        (listener, token): (TcpListener, Option<String>),
        device: Device,
        device_name: &str,
        ready: impl FnOnce(&Listening),
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<()> {
        let address = listener.local_addr()?;
        let log = Arc::new(log);
        let sessions = SessionLog::start(device_name.to_string(), log.clone());
        let pending = sessions.pending.clone();
        let authorize_log = log.clone();
        let checker = token.as_deref().map(TokenAuthorizer::new).transpose().map_err(|e| anyhow!("--token: {e}"))?;
        let authorizer = move |request: AuthorizationRequest<'_>| {
            let who = request.client.to_string();
            let verdict = match &checker {
                Some(c) => burn::server::PeerAuthorizer::authorize(c, request)
                    .map_err(|_| "wrong or missing token".to_string()),
                None => Ok(()),
            };
            match &verdict {
                Ok(()) => pending.lock().unwrap_or_else(|p| p.into_inner()).push_back(who),
                Err(why) => authorize_log(&format!("serve: refused {who}: {why}")),
            }
            verdict
        };
        let server = RemoteServer::new([device]).with_authorizer(authorizer).with_telemetry(sessions.probe.clone());
        ready(&Listening { address, token_required: token.is_some() });
        server.serve(WebSocketTransport::from_listener(listener)).map_err(|e| anyhow!("serve: {e}"))
    }
}

/// Session lines from burn's telemetry: a session opens after the authorizer let its client in
/// (`pending`, in order) and closes when the client goes away.
struct SessionLog {
    probe: TelemetryProbe,
    pending: Arc<Mutex<VecDeque<String>>>,
}

impl SessionLog {
    fn start(device_name: String, log: Arc<impl Fn(&str) + Send + Sync + 'static>) -> Self {
        // Every operation is an event: a generous backlog, drained often, so an open or close is
        // not lost behind a burst of them.
        let (probe, mut events) = TelemetryProbe::channel(1 << 18);
        let pending: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let queue = pending.clone();
        std::thread::spawn(move || {
            let mut open = std::collections::HashMap::new();
            let mut opened = 0u64;
            let mut batch = Vec::new();
            loop {
                let status = events.drain_into(&mut batch);
                for event in batch.drain(..) {
                    match event.as_ref() {
                        TelemetryEvent::SessionOpened { session, device } => {
                            let who = queue
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .pop_front()
                                .unwrap_or_else(|| "a client".into());
                            opened += 1;
                            log(&format!("serve: session {opened} opened by {who} on device {device} ({device_name})"));
                            open.insert(*session, (opened, who, Instant::now(), 0u64));
                        }
                        TelemetryEvent::Op { session, .. } | TelemetryEvent::GraphExecuted { session, .. } => {
                            if let Some(s) = open.get_mut(session) {
                                s.3 += 1;
                            }
                        }
                        TelemetryEvent::SessionClosed { session } => {
                            if let Some((number, who, since, ops)) = open.remove(session) {
                                log(&format!(
                                    "serve: session {number} of {who} closed after {:.1}s ({ops} operations)",
                                    since.elapsed().as_secs_f64()
                                ));
                            }
                        }
                        _ => {}
                    }
                }
                if matches!(status, DrainStatus::Closed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { probe, pending }
    }
}

/// Prints a line and flushes (a test or a script reads the port from the first line).
pub fn print_line(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
