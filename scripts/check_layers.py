#!/usr/bin/env python3
"""Holds the code to its map (DESIGN.md's layer table, the README's Architecture): every
`crate::` path a module names must point to a layer it may call; no source file is over
600 lines and no function over 80, but for the exceptions below, each with its reason.

    scripts/check_layers.py           # check; exit 1 on a violation
    scripts/check_layers.py --graph   # also print the import graph between layers
"""

import argparse
import collections
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Who may call whom: DESIGN.md's table. `config` (the command line's plain data) is read by
# the front ends that take its structs whole (`api` its ServeArgs, `train` its
# FinetuneArgs); `runtime`, the composition root, may call everything.
MAY_CALL = {
    "openai": set(),
    "media": set(),
    "kv": set(),
    "config": set(),
    "metrics": set(),
    "model": {"kv"},
    "engine": {"model", "kv"},
    "processor": {"openai", "media", "engine", "model"},
    "api": {"openai", "processor", "engine", "metrics", "config"},
    "train": {"openai", "processor", "model", "config"},
    "runtime": None,  # everything
}

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

# (file, function) -> why it may be longer than MAX_FUNCTION_LINES.
LONG_FUNCTIONS = {
    ("src/metrics.rs", "new"): "a table: every metric registered with its help text and buckets",
    ("src/model/ops/decode_attention.rs", "with_simd"): (
        "one SIMD kernel, kept whole so that pulp compiles it once per instruction set"
    ),
    ("tests/server_errors.rs", "cases"): "a table of bad requests and their statuses",
    ("tests/metrics.rs", "a_known_set_of_requests_leaves_exact_counts"): "one scenario against one server",
    ("tests/media.rs", "urls_and_local_files_work_and_every_bad_source_gets_a_clear_400"): (
        "one scenario against one server and one media server"
    ),
    ("tests/video.rs", "videos_from_anywhere_answer_as_transformers_and_bad_ones_get_a_clear_400"): (
        "one scenario against one server"
    ),
    ("tests/lora.rs", "broken_adapter_folders_are_refused_naming_what_is_wrong"): "a table of broken folders",
    ("tests/grpc.rs", "grpc_answers_as_http_does_and_reports_health"): "one scenario against one server",
    ("tests/drain.rs", "sigterm_drains_running_streams_then_exits_zero"): "one scenario against one process",
}

FN = re.compile(r"^\s*(pub(\([a-z]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def code_lines(path):
    """The file's lines with comments and string contents blanked."""
    out = []
    for line in path.read_text().splitlines():
        line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
        line = re.sub(r"'(\\.|[^'\\])'", "''", line)
        out.append(line.split("//")[0])
    return out


def layer_of(path):
    parts = path.relative_to(ROOT / "src").parts
    return parts[0].removesuffix(".rs")


def imports(paths):
    """(from layer, to layer) -> [(file, line number, path named)]."""
    edges = collections.defaultdict(list)
    for path in paths:
        source = layer_of(path)
        for number, line in enumerate(code_lines(path), 1):
            for match in re.finditer(r"crate::(\w+)((::\w+)*)", line):
                target = match.group(1)
                if target != source:
                    named = match.group(0)
                    if "{" in line[match.end() : match.end() + 3]:
                        named += "::{…}"
                    edges[(source, target)].append((path.relative_to(ROOT), number, named))
    return edges


def long_functions(path):
    """(name, first line, length) of each function over the limit."""
    lines = code_lines(path)
    found = []
    for start, line in enumerate(lines):
        match = FN.match(line)
        if not match:
            continue
        depth, opened = 0, False
        for end in range(start, len(lines)):
            for ch in lines[end]:
                if ch == "{":
                    depth, opened = depth + 1, True
                elif ch == "}":
                    depth -= 1
            if opened and depth == 0:
                break
            if not opened and lines[end].rstrip().endswith(";"):
                break
        length = end - start + 1
        if length > MAX_FUNCTION_LINES:
            found.append((match.group(6), start + 1, length))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", action="store_true")
    args = parser.parse_args()
    sources = sorted(p for p in (ROOT / "src").rglob("*.rs") if p.name not in ("lib.rs", "main.rs"))
    failures = []
    edges = imports(sources)
    for (source, target), uses in sorted(edges.items()):
        allowed = MAY_CALL.get(source, set())
        ok = allowed is None or target in allowed
        if args.graph:
            named = sorted({use for _, _, use in uses})
            print(f"{source} -> {target} ({len(uses)}){'' if ok else '  NOT ALLOWED'}: {', '.join(named)}")
        if not ok:
            for file, number, line in uses:
                failures.append(f"{file}:{number}: `{source}` may not call `{target}`: {line}")
    checked = sources + sorted((ROOT / "src").glob("*.rs"))
    checked += sorted((ROOT / "benches").rglob("*.rs")) + sorted((ROOT / "tests").rglob("*.rs"))
    for path in sorted(set(checked)):
        relative = path.relative_to(ROOT).as_posix()
        count = len(path.read_text().splitlines())
        if count > MAX_FILE_LINES:
            failures.append(f"{relative}: {count} lines, more than {MAX_FILE_LINES}")
        for name, line, length in long_functions(path):
            if (relative, name) not in LONG_FUNCTIONS:
                failures.append(f"{relative}:{line}: `{name}` is {length} lines, more than {MAX_FUNCTION_LINES}")
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"layers and sizes: {len(checked)} files hold to the map")


if __name__ == "__main__":
    main()
