//! The Plots view: the paper's figures from a run — Δ histogram coloured by class (with the
//! [0.9, 1] zoom), ν^ε vs ν^r for chat-only latents beside the shared baseline, and the count of
//! chat-only latents below a ν threshold (log scale). Clicking near a point opens that latent;
//! each figure exports its data as CSV.

use crossdiff::analysis::figures::{below_threshold_curve, delta_histogram, histogram_csv, nu_points};
use crossdiff::analysis::kl::KlStat;
use crossdiff::analysis::latents::{LatentClass, LatentRow};
use crossdiff::run_dir::RunDir;
use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints, Points, VLine};

use crate::commands::{AppCommand, Commands};
use crate::widgets::{GUIDE_COLOR, SERIES_COLOR, class_bars, class_color};

pub struct PlotsView {
    pub run_dir: String,
    rows: Vec<LatentRow>,
    /// The run's kl.json, when it has one (read in `load`, not per frame).
    kl: Option<Vec<KlStat>>,
    error: Option<String>,
    pub message: Option<String>,
    /// Where a PNG export landed (set by the screenshot callback, shown next frame).
    png_result: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Every figure's data, derived once per loaded run (not per frame).
    figures: Option<std::rc::Rc<Figures>>,
    /// Scroll to the KL bars for up to this many more frames, until they are in sight (the tour's
    /// causality step; a frame egui discards loses a scroll request).
    scroll_to_kl: u8,
}

/// The data behind the figures, computed from the rows in `load`.
struct Figures {
    /// Δ histograms over [0, 1] and the [0.9, 1] zoom, 100 bins each.
    delta: [Vec<(LatentClass, Vec<u64>)>; 2],
    nu_chat: Vec<(usize, f64, f64)>,
    nu_shared: Vec<(usize, f64, f64)>,
    /// Decoder cosine over [−1, 1] and frequency over [0, max], 50 bins each, with their ranges.
    per_field: [(Vec<(LatentClass, Vec<u64>)>, f64, f64); 2],
    /// Chat-only latents below each ν threshold 0, 0.01, …, 1.
    below: Vec<(f64, usize)>,
}

impl Figures {
    fn of(rows: &[LatentRow]) -> Self {
        use crossdiff::analysis::figures::class_histogram;
        let max_freq = rows.iter().map(|r| r.freq).fold(1e-9, f64::max);
        let thresholds: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
        Self {
            delta: [delta_histogram(rows, 0.0, 1.0, 100), delta_histogram(rows, 0.9, 1.0, 100)],
            nu_chat: nu_points(rows, LatentClass::ChatOnly),
            nu_shared: nu_points(rows, LatentClass::Shared),
            per_field: [
                (class_histogram(rows, |r| r.dec_cos, -1.0, 1.0, 50), -1.0, 1.0),
                (class_histogram(rows, |r| r.freq, 0.0, max_freq, 50), 0.0, max_freq),
            ],
            below: below_threshold_curve(rows, &thresholds),
        }
    }
}

impl PlotsView {
    pub fn new(run_dir: String) -> Self {
        Self {
            run_dir,
            rows: Vec::new(),
            kl: None,
            error: None,
            message: None,
            png_result: Default::default(),
            figures: None,
            scroll_to_kl: 0,
        }
    }

    /// Reads the run's latents.csv and (when there) kl.json.
    pub fn load(&mut self) {
        let run = RunDir::new(&self.run_dir);
        crate::widgets::load_latents(&run, &mut self.rows, &mut self.error);
        self.figures = Some(std::rc::Rc::new(Figures::of(&self.rows)));
        self.kl = run.read_kl().ok();
    }

    /// Shows run `run` (a project opened, an analysis or KL check finished): reloads its figures.
    pub fn show_run(&mut self, run: &str) {
        self.run_dir = run.to_string();
        self.load();
    }

    /// Shows run `run` (loading it unless it is the one shown) scrolled to its KL bars.
    pub fn show_kl(&mut self, run: &str) {
        if self.run_dir != run || self.rows.is_empty() {
            self.show_run(run);
        }
        self.scroll_to_kl = if self.kl.is_some() { 5 } else { 0 };
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, commands: &mut Commands) {
        ui.horizontal(|ui| {
            let name = ui.label("Run directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.run_dir).desired_width(420.0)).labelled_by(name);
            if ui.button("Load figures").clicked() {
                self.load();
            }
            if ui.button("Export PNG").clicked() {
                // The window as rendered, saved as RUN/figures.png.
                let path = RunDir::new(&self.run_dir).file(RunDir::FIGURES_PNG);
                let result = self.png_result.clone();
                ui.ctx().send_viewport_cmd(egui::ViewportCommand::Screenshot(egui::ScreenshotCallback::new(
                    move |img| {
                        let [w, h] = img.size;
                        let bytes: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
                        let msg = match image::save_buffer(
                            &path,
                            &bytes,
                            w as u32,
                            h as u32,
                            image::ExtendedColorType::Rgba8,
                        ) {
                            Ok(()) => format!("wrote {}", path.display()),
                            Err(e) => format!("cannot write {}: {e}", path.display()),
                        };
                        if let Ok(mut r) = result.lock() {
                            *r = Some(msg);
                        }
                    },
                )));
            }
        });
        if let Some(m) = self.png_result.lock().ok().and_then(|mut r| r.take()) {
            self.message = Some(m);
        }
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
        }
        if let Some(m) = &self.message {
            ui.label(m.as_str());
        }
        let Some(fig) = self.figures.clone().filter(|_| !self.rows.is_empty()) else { return };
        if self.kl.is_none() {
            ui.horizontal(|ui| {
                ui.weak("No KL check for this run yet (kl.json).");
                if ui.button("Run the KL check").clicked() {
                    commands.push(AppCommand::AnalyzeRun { run: self.run_dir.clone(), cache: None });
                }
            });
        }
        egui::ScrollArea::vertical().show(ui, |ui| {
            for (i, (title, lo, hi)) in
                [("Relative decoder norm Δ", 0.0, 1.0), ("Δ, zoom on [0.9, 1]", 0.9, 1.0)].into_iter().enumerate()
            {
                let series = &fig.delta[i];
                ui.horizontal(|ui| {
                    ui.strong(title);
                    if ui.button(format!("Export CSV: {title}")).clicked() {
                        let path = RunDir::new(&self.run_dir).file(if lo == 0.0 {
                            RunDir::FIG_DELTA_CSV
                        } else {
                            RunDir::FIG_DELTA_ZOOM_CSV
                        });
                        let csv = histogram_csv(series, lo, hi);
                        self.message = Some(match std::fs::write(&path, csv) {
                            Ok(()) => format!("wrote {}", path.display()),
                            Err(e) => format!("cannot write {}: {e}", path.display()),
                        });
                    }
                });
                let w = (hi - lo) / 100.0;
                Plot::new(title).height(160.0).legend(Legend::default()).show(ui, |plot| {
                    class_bars(plot, series, lo, w);
                    for x in [0.1, 0.4, 0.6, 0.9] {
                        if x >= lo && x <= hi {
                            plot.vline(
                                VLine::new(format!("{x}"), x)
                                    .color(GUIDE_COLOR)
                                    .style(egui_plot::LineStyle::dashed_loose()),
                            );
                        }
                    }
                });
            }
            ui.strong("ν^ε vs ν^r: chat-only latents and the shared baseline (click a point to open it)");
            let (chat, shared) = (&fig.nu_chat, &fig.nu_shared);
            let response = Plot::new("nu scatter").height(260.0).legend(Legend::default()).show(ui, |plot| {
                let pts = |v: &[(usize, f64, f64)]| -> PlotPoints { v.iter().map(|(_, e, r)| [*e, *r]).collect() };
                plot.points(Points::new("shared", pts(shared)).color(class_color(LatentClass::Shared)).radius(2.0));
                plot.points(Points::new("chat-only", pts(chat)).color(class_color(LatentClass::ChatOnly)).radius(3.0));
                plot.pointer_coordinate()
            });
            if response.response.clicked() {
                if let Some(p) = response.inner {
                    let nearest = chat.iter().chain(shared).min_by(|a, b| {
                        let d = |q: &(usize, f64, f64)| (q.1 - p.x).powi(2) + (q.2 - p.y).powi(2);
                        d(a).total_cmp(&d(b))
                    });
                    if let Some(q) = nearest {
                        commands.push(AppCommand::OpenLatent { run: self.run_dir.clone(), latent: q.0 });
                    }
                }
            }
            for (title, (series, lo, hi)) in
                ["Decoder cosine per class", "Activation frequency per class"].into_iter().zip(&fig.per_field)
            {
                ui.strong(title);
                let w = (hi - lo) / 50.0;
                Plot::new(title).height(140.0).legend(Legend::default()).show(ui, |plot| {
                    class_bars(plot, series, *lo, w);
                });
            }
            if let Some(kl) = &self.kl {
                if self.scroll_to_kl > 0 {
                    let now = egui::style::ScrollAnimation::none();
                    ui.scroll_to_cursor_animation(Some(egui::Align::TOP), now);
                }
                let title = ui.strong("KL(P_chat || P_patched) per condition, all reply tokens, with 95% CIs");
                let in_sight = ui.clip_rect().contains_rect(title.rect);
                self.scroll_to_kl = if in_sight { 0 } else { self.scroll_to_kl.saturating_sub(1) };
                Plot::new("kl bars").height(180.0).show(ui, |plot| {
                    let bars = kl
                        .iter()
                        .enumerate()
                        .map(|(i, k)| Bar::new(i as f64, k.mean_all).name(&k.condition).width(0.6))
                        .collect();
                    plot.bar_chart(BarChart::new("KL", bars).color(SERIES_COLOR));
                    for (i, k) in kl.iter().enumerate() {
                        let (m, ci) = (k.mean_all, k.ci_all);
                        plot.line(
                            Line::new(
                                format!("CI {i}"),
                                PlotPoints::from(vec![[i as f64, m - ci], [i as f64, m + ci]]),
                            )
                            .color(GUIDE_COLOR),
                        );
                    }
                });
                ui.label(
                    kl.iter().enumerate().map(|(i, k)| format!("{i}: {}", k.condition)).collect::<Vec<_>>().join("   "),
                );
            }
            // Marginals of the scatter: ν^ε and ν^r histograms, chat-only vs the shared baseline.
            ui.columns(2, |cols| {
                for (c, (name, pick)) in [
                    ("ν^ε", (|p: &(usize, f64, f64)| p.1) as fn(&(usize, f64, f64)) -> f64),
                    ("ν^r", |p: &(usize, f64, f64)| p.2),
                ]
                .into_iter()
                .enumerate()
                {
                    cols[c].label(format!("{name} histogram"));
                    Plot::new(format!("{name} marginal")).height(120.0).legend(Legend::default()).show(
                        &mut cols[c],
                        |plot| {
                            for (label, pts, class) in
                                [("chat-only", chat, LatentClass::ChatOnly), ("shared", shared, LatentClass::Shared)]
                            {
                                let counts =
                                    crossdiff::analysis::figures::histogram(pts.iter().map(pick), -0.5, 1.5, 40);
                                let bars = counts
                                    .iter()
                                    .enumerate()
                                    .map(|(b, &n)| Bar::new(-0.5 + (b as f64 + 0.5) * 0.05, n as f64).width(0.05))
                                    .collect();
                                plot.bar_chart(BarChart::new(label, bars).color(class_color(class)));
                            }
                        },
                    );
                }
            });
            ui.strong("Chat-only latents with |ν^ε| and |ν^r| below a threshold (log10 count)");
            Plot::new("below threshold").height(160.0).show(ui, |plot| {
                let pts: PlotPoints =
                    fig.below.iter().filter(|(_, c)| *c > 0).map(|(p, c)| [*p, (*c as f64).log10()]).collect();
                plot.line(Line::new("count", pts).color(class_color(LatentClass::ChatOnly)));
            });
        });
    }
}
