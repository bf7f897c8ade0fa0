"""A soak test (not CI): mixed traffic against one server for a long while, at a fixed
concurrency, watching that nothing leaks and nothing is lost.

    python3 scripts/soak.py --binary target/release/ocellus --model /tmp/big/models/smolvlm-256m-random \
        [--minutes 30] [--concurrency 32] [--out soak.json]

Traffic, each worker drawing one request after another: streamed chats (text, and with an
image from a pool of 24 generated PNGs at `detail: low`, so the vision cache both hits and
misses), whole
chats with an image, completions, streams the client drops after their first tokens, and bad
requests of eight kinds. The server is started with a small queue (--max-num-seqs 8,
--max-queue 8) so that concurrency 32 also meets 429s, after which a worker waits the
Retry-After the server sends, as OpenAI's clients do. Every request ends in one expected
outcome or is counted as unexpected (any 5xx, an unexpected code, a stream without its
end, a request with no answer in 120 s). Each minute: the server's resident memory and its
KV cache blocks in use. At the end, with traffic stopped, the KV blocks in use must be 0.
Python's standard library only.
"""

import argparse
import base64
import http.client
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter

parser = argparse.ArgumentParser()
parser.add_argument("--binary", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--minutes", type=float, default=30)
parser.add_argument("--concurrency", type=int, default=32)
parser.add_argument("--out", default="soak.json")
args = parser.parse_args()


def png(width, height, seed):
    """An RGB PNG of a seeded pattern."""
    rng = random.Random(seed)
    colours = [bytes(rng.randrange(256) for _ in range(3)) for _ in range(4)]
    rows = b"".join(b"\0" + b"".join(colours[(x // 16 + y // 16) % 4] for x in range(width)) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


IMAGES = ["data:image/png;base64," + base64.b64encode(png(*size, seed)).decode()
          for seed, size in enumerate([(96, 96), (512, 384), (300, 700)] * 8)]

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    PORT = probe.getsockname()[1]
server = subprocess.Popen(
    [args.binary, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(PORT),
     "--max-num-seqs", "8", "--max-queue", "8", "--served-model-name", "soak"],
    stdout=subprocess.DEVNULL, stderr=open("soak-server.log", "w"),
)


def request(method, path, body=None, timeout=120):
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    connection.request(method, path, body=None if body is None else json.dumps(body),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def scrape():
    connection, response = request("GET", "/metrics", timeout=10)
    text = response.read().decode()
    connection.close()
    return text


def resident_mib():
    for line in open(f"/proc/{server.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def chat(content, max_tokens, stream):
    return {"model": "soak", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": stream}


def with_image(text):
    # `low`: one 512-pixel view. On a 2-core CPU an `auto` image of 512x384 is 13 SigLIP tiles
    # of 1,024 patches for the 256M model, about a minute of encoding: the soak would measure
    # little but that queue.
    return [{"type": "image_url", "image_url": {"url": random.choice(IMAGES), "detail": "low"}},
            {"type": "text", "text": text}]


BAD = [
    ("invalid_json", b"{not json"),
    ("invalid_value", {"model": "soak", "messages": [{"role": "user", "content": "x"}], "temperature": 5}),
    ("invalid_image", chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                            {"type": "text", "text": "x"}], 4, False)),
    ("unsupported_parameter", {"model": "soak", "messages": [{"role": "user", "content": "x"}], "temprature": 1}),
    ("too_many_images", chat([{"type": "image_url", "image_url": {"url": IMAGES[0]}}] * 9 + [{"type": "text", "text": "x"}], 4, False)),
    ("model_not_found", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ("media_address_not_allowed", chat([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}], 4, False)),
    ("context_length_exceeded", {"model": "soak", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**7}),
]

outcomes = Counter()
ttfts = []
lock = threading.Lock()
stop = threading.Event()


def record(outcome, ttft=None):
    with lock:
        outcomes[outcome] += 1
        if ttft is not None:
            ttfts.append(ttft)


def stream_one(body, drop_after=None):
    started = time.monotonic()
    connection, response = request("POST", "/v1/chat/completions", body)
    if response.status != 200:
        return finish_error(connection, response)
    first, tokens, done = None, 0, False
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            connection.close()
            return record(f"stream_error:{chunk['error'].get('code')}")
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            if first is None:
                first = time.monotonic() - started
            if drop_after is not None and tokens >= drop_after:
                connection.close()  # the client leaves mid-stream
                return record("dropped_stream", first)
    connection.close()
    record("stream_ok" if done else "unexpected:stream_without_end", first)


def finish_error(connection, response):
    body = response.read()
    connection.close()
    if response.status == 429:
        # As OpenAI's clients do: wait what Retry-After says before the next request.
        time.sleep(float(response.getheader("Retry-After", "1")))
        return record("429")
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    return record(f"unexpected:{response.status}:{code}")


def whole(path, body, expect="ok"):
    connection, response = request("POST", path, body)
    if response.status == 200:
        response.read()
        connection.close()
        return record(expect)
    return finish_error(connection, response)


def bad_one():
    code, body = random.choice(BAD)
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    if response.status == 429:
        time.sleep(float(response.getheader("Retry-After", "1")))
        return record("429")
    got = json.loads(answer).get("error", {}).get("code") if answer.startswith(b"{") else None
    record(f"bad_refused:{code}" if response.status in (400, 404) and got == code else f"unexpected:bad:{code}:{response.status}:{got}")


def worker(seed):
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choices(["text", "image", "whole", "completion", "drop", "bad"], [25, 25, 10, 10, 15, 15])[0]
        try:
            if kind == "text":
                stream_one(chat("Tell me a story about a lighthouse.", rng.randint(16, 96), True))
            elif kind == "image":
                stream_one(chat(with_image("What is in this picture?"), rng.randint(8, 48), True))
            elif kind == "whole":
                whole("/v1/chat/completions", chat(with_image("Describe it."), rng.randint(8, 32), False))
            elif kind == "completion":
                whole("/v1/completions", {"model": "soak", "prompt": "Once upon a time", "max_tokens": rng.randint(8, 64)})
            elif kind == "drop":
                stream_one(chat("Count to one hundred.", 256, True), drop_after=rng.randint(1, 4))
            else:
                bad_one()
        except (OSError, http.client.HTTPException) as error:
            record(f"unexpected:transport:{type(error).__name__}")


def wait_ready():
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            connection, response = request("GET", "/health", timeout=5)
            response.read()
            connection.close()
            if response.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server never became ready")


wait_ready()
started = time.monotonic()
threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
for thread in threads:
    thread.start()
samples = []
minute = 0
while minute < args.minutes:
    time.sleep(max(0.0, started + (minute + 1) * 60 - time.monotonic()))
    minute += 1
    text = scrape()
    sample = {"minute": minute, "rss_mib": resident_mib(), "kv_used_blocks": metric(text, "ocellus_kv_cache_used_blocks"),
              "running": metric(text, "ocellus_running_sequences"), "waiting": metric(text, "ocellus_waiting_sequences"),
              "requests": sum(outcomes.values())}
    samples.append(sample)
    print(json.dumps(sample), flush=True)
stop.set()
for thread in threads:
    thread.join(timeout=180)
lost = sum(thread.is_alive() for thread in threads)
time.sleep(1)  # a dropped stream's sequence ends at the engine's next step
text = scrape()
end = {"kv_used_blocks": metric(text, "ocellus_kv_cache_used_blocks"), "running": metric(text, "ocellus_running_sequences"),
       "waiting": metric(text, "ocellus_waiting_sequences"), "rss_mib": resident_mib()}
server.terminate()
exit_code = server.wait(timeout=120)
ttfts.sort()
pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None
report = {
    "minutes": args.minutes, "concurrency": args.concurrency, "outcomes": dict(sorted(outcomes.items())),
    "unexpected": sum(n for k, n in outcomes.items() if k.startswith("unexpected")), "workers_stuck": lost,
    "ttft_p50_s": pick(0.5), "ttft_p99_s": pick(0.99), "samples": samples, "end": end, "server_exit_code": exit_code,
    "cpu": os.popen("lscpu | grep -E 'Model name|^Flags' | cut -c1-200").read(),
}
json.dump(report, open(args.out, "w"), indent=1)
print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
