//! `keepwire-agent`: the desktop background agent as its own small binary.

fn main() -> std::process::ExitCode {
    keepwire::main_agent()
}
