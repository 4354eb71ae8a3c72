//! The `keepwire` command (see the library's documentation).

fn main() -> std::process::ExitCode {
    keepwire::main_cli()
}
