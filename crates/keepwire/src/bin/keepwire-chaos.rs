//! `keepwire-chaos`: chaos runs with an exactly-once checker and the fault
//! proxy, kept out of the shipping `keepwire` binary.

fn main() -> std::process::ExitCode {
    keepwire::main_chaos()
}
