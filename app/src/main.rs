//! `crossdiff`: the command line; with no subcommand, the desktop app.

fn main() {
    if std::env::args_os().len() <= 1 {
        if let Err(e) = crossdiff_app::app::run() {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = crossdiff_app::cli::run() {
        // One line: the context chain joined, no backtrace.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
