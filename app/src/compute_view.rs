//! The Compute setting: the remote `crossdiff serve` processes the user added, which the top bar's
//! Device selector offers beside the local backends (a job runs on the device selected when it
//! starts). One window, opened from the top bar: add a server by its `ws://HOST:PORT` (checked by
//! the engine's parser, whose one-line error shows beside the field), remove it, or test it (a
//! connect on a background job, never in a frame). The servers' addresses persist across starts;
//! their tokens never do (typed each session, else `CROSSDIFF_REMOTE_TOKEN`).

use crossdiff::Backend;
use crossdiff::backend::RemoteServer;
use eframe::egui;

use crate::errors::{Field, Fields, phrase_text};
use crate::jobs::{Job, JobSlot};

/// Where the servers' addresses are kept (eframe storage), without their tokens.
pub const SERVERS_KEY: &str = "remote_servers";

/// The new server's address field.
pub const URL_LABEL: &str = "Server URL";
/// The new server's token field.
pub const TOKEN_LABEL: &str = "Token";

/// The engine's flags as this window names them.
const FIELDS: Fields = &[("remote-token", Field::Value(TOKEN_LABEL)), ("backend", Field::Value(URL_LABEL))];

const TOKEN_HINT: &str = "The token `crossdiff serve` was started with (--token). Tokens are never saved: type it \
     each session, or set CROSSDIFF_REMOTE_TOKEN before starting the app (used when this field is empty).";

/// A remote server the Device selector offers.
pub struct Server {
    /// The address as the engine parsed it (its token: the one the app was started with, if any).
    remote: RemoteServer,
    /// The token typed this session (empty: the started-with one, else CROSSDIFF_REMOTE_TOKEN's).
    pub token: String,
    /// The last Test's connect.
    test: JobSlot,
}

impl Server {
    fn new(remote: RemoteServer, token: String) -> Self {
        Self { remote, token, test: JobSlot::new(FIELDS) }
    }

    /// `ws://HOST:PORT`.
    pub fn url(&self) -> &str {
        &self.remote.url
    }

    /// What jobs run on when this server is selected: its address with the typed token, if any.
    pub fn backend(&self) -> Backend {
        let typed = Some(self.token.trim().to_string()).filter(|t| !t.is_empty());
        Backend::Remote(self.remote.clone()).with_remote_token(typed)
    }

    /// Connects the server's device on a background job: its description, or the engine's error.
    fn start_test(&mut self, ctx: &egui::Context) {
        let backend = self.backend();
        self.test.start(Job::spawn("test", ctx.clone(), move |_| {
            backend.device().map_err(|e| anyhow::anyhow!(unflagged(&e, &format!("--backend {backend}: "))))?;
            Ok(backend.describe())
        }));
    }

    /// The last Test's outcome, on its own line.
    fn test_ui(&mut self, ui: &mut egui::Ui) {
        self.test.poll();
        let Some(job) = self.test.job() else { return };
        match &job.finished {
            None => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(format!("testing {}…", self.remote.url));
                });
            }
            Some(Ok(described)) => {
                ui.colored_label(egui::Color32::LIGHT_GREEN, format!("ok: {described}"));
            }
            Some(Err(e)) => {
                ui.colored_label(egui::Color32::LIGHT_RED, format!("{}: {e}", self.remote.url));
            }
        }
    }
}

/// An engine error as one line, without the flag it starts with (this window names the server in
/// its own row), its other flags named by this window's fields.
fn unflagged(e: &anyhow::Error, flag: &str) -> String {
    let text = format!("{e:#}").replace('\n', " ");
    phrase_text(text.strip_prefix(flag).unwrap_or(&text), FIELDS)
}

/// The Compute window: the servers, and the fields of the next one to add.
#[derive(Default)]
pub struct ComputeView {
    pub open: bool,
    pub servers: Vec<Server>,
    /// The new server's address as typed.
    pub url: String,
    /// The new server's token as typed (never saved).
    pub token: String,
    /// Why the last Add was refused.
    pub error: Option<String>,
}

impl ComputeView {
    /// Adds a server by its `ws://HOST:PORT`; the engine's one-line error when that is not one, or
    /// a note when it is listed already (nothing added then).
    pub fn add(&mut self, url: &str, token: &str) -> Result<(), String> {
        let url = url.trim();
        let remote = match format!("remote:{url}").parse::<Backend>() {
            Ok(Backend::Remote(r)) => r,
            Ok(_) => return Err(format!("{url}: expected ws://HOST:PORT")),
            Err(e) => return Err(unflagged(&e, &format!("--backend remote:{url}: "))),
        };
        if self.servers.iter().any(|s| s.remote.url == remote.url) {
            return Err(format!("{} is in the list already", remote.url));
        }
        self.servers.push(Server::new(remote, token.trim().to_string()));
        Ok(())
    }

    /// The addresses to remember (no tokens).
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.remote.url.clone()).collect()
    }

    /// Lists the remembered addresses again (an address the parser now refuses is dropped).
    pub fn restore(&mut self, urls: Vec<String>) {
        for url in urls {
            let _ = self.add(&url, "");
        }
    }

    /// The remote device the app was started on (`--backend remote:… [--remote-token T]`) joins
    /// the list, or updates its listed server, with the token it was given.
    pub fn adopt(&mut self, backend: &Backend) {
        let Backend::Remote(r) = backend else { return };
        match self.servers.iter_mut().find(|s| s.remote.url == r.url) {
            Some(s) => s.remote = r.clone(),
            None => self.servers.push(Server::new(r.clone(), String::new())),
        }
    }

    /// What the Device selector offers after the local backends.
    pub fn backends(&self) -> impl Iterator<Item = Backend> + '_ {
        self.servers.iter().map(Server::backend)
    }

    /// The window (when open); `backend` is the app's device: a selected server follows its typed
    /// token, and removing it selects `auto`.
    pub fn window(&mut self, ctx: &egui::Context, backend: &mut Backend) {
        let mut open = self.open;
        egui::Window::new("Compute").open(&mut open).default_width(560.0).show(ctx, |ui| self.ui(ui, backend));
        self.open = open;
        if let Backend::Remote(r) = &*backend
            && let Some(s) = self.servers.iter().find(|s| s.remote.url == r.url)
        {
            *backend = s.backend();
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, backend: &mut Backend) {
        ui.label(
            "Remote servers: `crossdiff serve --port PORT` on the machine with the device (reached from \
             another machine: add `--bind 0.0.0.0 --token T`, or tunnel the port over SSH). The Device \
             selector offers each; a job runs on the device selected when it starts (data, checkpoints \
             and outputs stay on this machine).",
        );
        ui.separator();
        let mut remove = None;
        for (i, server) in self.servers.iter_mut().enumerate() {
            ui.horizontal(|ui| {
                ui.monospace(&server.remote.url);
                let name = ui.label("token").id;
                let field = egui::TextEdit::singleline(&mut server.token).password(true).desired_width(140.0);
                let hint = if server.remote.token.is_some() { "set at start" } else { "none" };
                ui.add(field.hint_text(hint)).labelled_by(name).on_hover_text(TOKEN_HINT);
                if ui.add_enabled(!server.test.running(), egui::Button::new("Test")).clicked() {
                    server.start_test(ui.ctx());
                }
                if ui.button("Remove").clicked() {
                    remove = Some(i);
                }
            });
            server.test_ui(ui);
        }
        if let Some(i) = remove {
            let gone = self.servers.remove(i);
            if matches!(backend, Backend::Remote(r) if r.url == gone.remote.url) {
                *backend = Backend::Auto;
            }
        }
        if self.servers.is_empty() {
            ui.weak("No servers yet.");
        }
        ui.separator();
        ui.horizontal(|ui| {
            let name = ui.label(URL_LABEL).id;
            let field = egui::TextEdit::singleline(&mut self.url).hint_text("ws://HOST:PORT").desired_width(220.0);
            if ui.add(field).labelled_by(name).changed() {
                self.error = None;
            }
            let name = ui.label(TOKEN_LABEL).id;
            let field = egui::TextEdit::singleline(&mut self.token).password(true).hint_text("optional");
            ui.add(field.desired_width(140.0)).labelled_by(name).on_hover_text(TOKEN_HINT);
            if ui.add_enabled(!self.url.trim().is_empty(), egui::Button::new("Add")).clicked() {
                let (url, token) = (self.url.clone(), self.token.clone());
                match self.add(&url, &token) {
                    Ok(()) => {
                        self.url.clear();
                        self.token.clear();
                        self.error = None;
                    }
                    Err(e) => self.error = Some(e),
                }
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
        }
    }
}
