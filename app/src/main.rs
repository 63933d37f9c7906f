//! `crossdiff`: the command line; with no subcommand, the desktop app.

fn main() {
    // Before anything allocates: large buffers are reused across steps instead of re-faulted.
    crossdiff::host_memory::keep_freed_memory();
    if let Err(e) = crossdiff_app::cli::run() {
        // One line: the context chain joined, no backtrace.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
