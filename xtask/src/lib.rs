//! pxelab's pipeline and lab as a library: `main.rs` only parses the command line and calls the
//! `run` function of one module per command. Integration tests in `xtask/tests/` call the same
//! modules directly.
//!
//! A command module exposes `#[derive(clap::Args)] pub struct Args` and
//! `pub fn run(args: Args) -> anyhow::Result<()>`; register it with one line in `main.rs`.

pub mod bench;
pub mod cache_cmd;
pub mod distro;
pub mod e2e;
pub mod fetch;
pub mod fetch_cmd;
pub mod hostdeps;
pub mod lab;
pub mod lock;
pub mod lock_cmd;
pub mod pin;
pub mod process;
pub mod recipe;
pub mod stack;
pub mod store;
pub mod testrun;
pub mod ui;
pub mod util;
