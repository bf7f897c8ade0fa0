"""llama.cpp on the same model as the peer benchmark: decode at batch 1 (f32 and q8_0
GGUFs, after a 512-token context as benches/model.rs decodes), prefill, and the time to
the first token of the photo and its vision encode per tile through llama.cpp's multimodal
CLI. Prints one JSON line.

    python scripts/bench_llamacpp.py MODEL_DIR --llama-cpp SRC [--threads 2] [--prompt-tokens 876]

SRC: a llama.cpp source tree (PyPI's llama-cpp-python sdist vendors one under
vendor/llama.cpp; its wheels are source-only) with `llama-bench` and `llama-mtmd-cli` built
in SRC/build/bin; see the README's Benchmarks section. The GGUFs are converted once, with
SRC's convert_hf_to_gguf.py, into target/peers/llamacpp/MODEL_NAME/.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "target/peers/llamacpp"
PHOTO = ROOT / "tests/fixtures/images/photo.png"
QUESTION = "Can you describe this image?"


def convert(src: pathlib.Path, model: pathlib.Path, outtype: str, name: str, mmproj: bool = False) -> pathlib.Path:
    out = OUT / model.resolve().name / name
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype, "--outfile", str(out)]
        if mmproj:
            cmd.append("--mmproj")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def bench(binary: pathlib.Path, gguf: pathlib.Path, threads: int, args: list[str]) -> list[dict]:
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "5", "-o", "json", *args]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def decode_tokens_per_s(binary, gguf, threads) -> float:
    # 64 tokens generated after 512 of context (-d), as the decode_step bench.
    [run] = bench(binary, gguf, threads, ["-p", "0", "-n", "64", "-d", "512"])
    return run["avg_ts"]


def photo(cli: pathlib.Path, text: pathlib.Path, mmproj: pathlib.Path, threads: int) -> tuple[float, float]:
    """A fresh process answering one token: (time to first token, vision encode per tile).
    The first is from the moment its log says the text model is loaded to its exit: the
    projector's load (about 0.3 s here), the image's decode, preprocessing and encode, the
    prompt's prefill and the first token. mtmd encodes one tile per batch and logs each."""
    cmd = [str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(PHOTO), "-p", QUESTION,
           "-n", "1", "-t", str(threads), "--temp", "0", "--no-warmup"]
    start = time.perf_counter()
    log = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    # Log lines start with the time since the process started: minutes.seconds.ms.us.
    stamp = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I main: loading model", log.stdout + log.stderr, re.M)
    if stamp is None:
        raise SystemExit("llama-mtmd-cli: no 'loading model' line in its log")
    minutes, seconds, ms, us = (int(g) for g in stamp.groups())
    tiles = [float(ms) / 1e3 for ms in re.findall(r"mtmd batch encoding done in ([\d.]+) ms", log.stdout + log.stderr)]
    if not tiles:
        raise SystemExit("llama-mtmd-cli: no 'batch encoding done' lines in its log")
    return wall - (60 * minutes + seconds + ms / 1e3 + us / 1e6), sum(tiles) / len(tiles)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("--llama-cpp", type=pathlib.Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=876)
    args = parser.parse_args()
    src, bin_dir = args.llama_cpp, args.llama_cpp / "build/bin"
    f32 = convert(src, args.model, "f32", "text-f32.gguf")
    q8 = convert(src, args.model, "q8_0", "text-q8_0.gguf")
    mmproj = convert(src, args.model, "f32", "mmproj-f32.gguf", mmproj=True)
    llama_bench = bin_dir / "llama-bench"
    [prefill] = bench(llama_bench, f32, args.threads, ["-p", str(args.prompt_tokens), "-n", "0"])
    ttft, tile = photo(bin_dir / "llama-mtmd-cli", f32, mmproj, args.threads)
    result = {
        "decode_tokens_per_s_batch1": decode_tokens_per_s(llama_bench, f32, args.threads),
        "decode_q8_0_tokens_per_s_batch1": decode_tokens_per_s(llama_bench, q8, args.threads),
        "prefill_tokens_per_s": prefill["avg_ts"],
        "ttft_photo_s": ttft,
        "vision_per_tile_s": tile,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
