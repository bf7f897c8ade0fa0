//! The `ocellus` command line.

use std::process::ExitCode;

/// Tensors of tens of megabytes come and go on every layer; glibc's malloc returns each to
/// the kernel and page-faults it back in (a quarter of the time in vision encoding), while
/// mimalloc keeps reusing the pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use ocellus::config::{Cli, Command, GenerateArgs, ServeArgs};
use ocellus::engine::{EngineConfig, GenerationRequest, SamplingParams};
use ocellus::kv::blocks_for;
use ocellus::processor::{ChatMessage, ContentPart, ImageInput, open_image};

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
        Command::Generate(args) => generate(args),
        Command::Finetune(args) => ocellus::train::finetune(&args).map(|_| ()),
        Command::DemoData(args) => demo_data(&args),
        Command::Evaluate(args) => ocellus::train::evaluate::run(&args).map(|report| println!("{report}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(ocellus::api::server::serve(args))
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let images = args
        .images
        .iter()
        .map(|path| open_image(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::text("system", system));
    }
    let mut content = vec![ContentPart::Image; images.len()];
    content.push(ContentPart::Text {
        text: args.prompt.clone(),
    });
    messages.push(ChatMessage {
        role: "user".into(),
        content,
    });
    let split = args.no_split.then_some(false);
    let images: Vec<ImageInput> = images.into_iter().map(|image| ImageInput { image, split }).collect();
    let prompt = loaded.processor.process(&messages, &images)?;
    let (prompt_tokens, tiles) = (prompt.token_ids.len(), prompt.tiles());
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..Default::default()
    };
    let request = GenerationRequest {
        sampling,
        ..GenerationRequest::greedy(prompt, args.max_tokens)
    };
    let config = EngineConfig {
        max_num_seqs: 1,
        max_batch_tokens: args.max_batch_tokens,
        max_model_len: loaded.model.info().max_positions,
        vision_cache_bytes: 0,
        prefix_caching: false,
    };
    let (_processor, mut engine) = loaded.into_engine(config, blocks_for(prompt_tokens + args.max_tokens))?;
    let (mut generations, t) = ocellus::engine::generate(&mut engine, vec![request], |_| {})?;
    let generation = generations.remove(0);
    println!("{}", generation.text);
    let per_tile = if tiles > 0 {
        t.vision.as_secs_f64() * 1e3 / tiles as f64
    } else {
        0.0
    };
    eprintln!(
        "prompt {prompt_tokens} tokens, {tiles} image tiles | vision encode {:.3} s ({per_tile:.1} ms/tile) | \
         prefill {:.3} s ({:.0} tokens/s) | decode {} tokens in {:.3} s ({:.1} tokens/s) | finish {}",
        t.vision.as_secs_f64(),
        t.prefill.as_secs_f64(),
        prompt_tokens as f64 / t.prefill.as_secs_f64(),
        t.decode_steps,
        t.decode.as_secs_f64(),
        t.decode_steps as f64 / t.decode.as_secs_f64().max(1e-9),
        generation.finish_reason.as_str(),
    );
    Ok(())
}

fn demo_data(args: &ocellus::config::DemoDataArgs) -> anyhow::Result<()> {
    use ocellus::train::synthetic::write_split;
    write_split(&args.out, "train", args.train, args.seed)?;
    write_split(&args.out, "test", args.test, args.seed + 1_000_000)?;
    eprintln!(
        "wrote {} training and {} test conversations to {}",
        args.train,
        args.test,
        args.out.display()
    );
    Ok(())
}
