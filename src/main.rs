//! The `ocellus` command line.

use std::process::ExitCode;

/// Tensors of tens of megabytes come and go on every layer; glibc's malloc returns each to
/// the kernel and page-faults it back in (a quarter of the time in vision encoding), while
/// mimalloc keeps reusing the pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use ocellus::config::{Cli, Command};

fn main() -> ExitCode {
    // Our own progress (listening, model loaded, draining) at info; dependencies' at warn.
    // RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,ocellus=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => ocellus::runtime::generate(&args),
        Command::Finetune(args) => ocellus::train::finetune(&args).map(|_| ()),
        Command::DemoData(args) => demo_data(&args),
        Command::Evaluate(args) => ocellus::runtime::evaluate(&args).map(|report| println!("{report}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ocellus::config::ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(ocellus::runtime::serve(args))
}

fn demo_data(args: &ocellus::config::DemoDataArgs) -> anyhow::Result<()> {
    use ocellus::train::synthetic::{write_caption_split, write_pair_split, write_split};
    write_split(&args.out, "train", args.train, args.seed)?;
    write_split(&args.out, "test", args.test, args.seed + 1_000_000)?;
    if args.captions {
        write_caption_split(&args.out, "train", args.train, args.seed)?;
        write_caption_split(&args.out, "test", args.test, args.seed + 1_000_000)?;
    }
    if args.preferences {
        write_pair_split(&args.out, "train", args.train, args.seed)?;
    }
    eprintln!(
        "wrote {} training and {} test conversations to {}",
        args.train,
        args.test,
        args.out.display()
    );
    Ok(())
}
