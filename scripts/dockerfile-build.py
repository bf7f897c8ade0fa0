#!/usr/bin/env python3
"""Runs the Dockerfile's build stages outside Docker, command for command, in a scratch
copy of the tree: no Docker engine runs here, and a Dockerfile whose steps are never run
breaks unseen (its dependency layer once stubbed three benches of four, and `docker build`
failed). Each stage gets its own root folder; WORKDIR and absolute COPY destinations are
mapped into it, COPY honours .dockerignore and --from, ARG and ENV become environment
variables, RUN runs with the Dockerfile's SHELL. RUN commands must therefore use paths
relative to their WORKDIR. The last stage (the runtime image: apt-get, useradd) is not run;
its COPY --from sources are checked to exist.

    scripts/dockerfile-build.py [--scratch DIR] [--build-arg NAME=VALUE ...]
"""

import argparse
import fnmatch
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def instructions(text):
    """(keyword, arguments) per instruction: continuations joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    if pending:
        sys.exit("Dockerfile: a continuation line at the end")
    return out


def ignored(relative, patterns):
    parts = pathlib.PurePosixPath(relative).parts
    for pattern in patterns:
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(part, pattern) for part in parts) or fnmatch.fnmatch(relative, pattern):
            return True
    return False


def expand(value, env):
    """A value as the shell would expand it (`${PATH}`, `${FEATURES:+...}`)."""
    return subprocess.run(["bash", "-c", f'printf %s "{value}"'], env=env, capture_output=True,
                          text=True, check=True).stdout


class Stage:
    def __init__(self, name, root, env, workdir="/"):
        self.name, self.root, self.env, self.workdir = name, root, env, workdir
        self.shell = ["/bin/sh", "-c"]

    def path(self, inside):
        """A path inside the stage's image, as a path on this machine."""
        absolute = inside if inside.startswith("/") else os.path.join(self.workdir, inside)
        return self.root / os.path.normpath(absolute).lstrip("/")


def copy(sources, dest, dest_is_dir, ignore):
    dest.parent.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if not source.exists():
            sys.exit(f"COPY: {source} does not exist")
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True, symlinks=True,
                            ignore=lambda folder, names: [n for n in names if ignore(pathlib.Path(folder) / n)])
        else:
            target = dest / source.name if dest_is_dir else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=pathlib.Path)
    parser.add_argument("--build-arg", action="append", default=[])
    args = parser.parse_args()
    scratch = args.scratch or pathlib.Path(tempfile.mkdtemp(prefix="ocellus-docker-"))
    given = dict(a.split("=", 1) for a in args.build_arg)
    dockerignore = ROOT / ".dockerignore"
    patterns = [line.strip() for line in dockerignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if dockerignore.exists() else []

    def context_ignore(path):
        return ignored(path.relative_to(ROOT).as_posix(), patterns)

    steps = instructions((ROOT / "Dockerfile").read_text())
    global_args, stages, stage = {}, {}, None
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    base_env = {k: v for k, v in os.environ.items()}
    for index, (keyword, rest) in enumerate(steps):
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            global_args[name] = given.get(name, default.strip('"'))
            continue
        if keyword == "FROM":
            words = rest.split()
            image = expand(words[0], {**base_env, **global_args})
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            if index == last_from:
                stage = Stage(name, None, {})
                stage.final = True
                continue
            root = scratch / name
            if image in stages:
                parent = stages[image]
                shutil.copytree(parent.root, root, symlinks=True)
                stage = Stage(name, root, dict(parent.env), parent.workdir)
                stage.shell = parent.shell
            else:
                root.mkdir(parents=True)
                stage = Stage(name, root, dict(base_env))
            stages[name] = stage
            print(f"== stage {name} (from {image})", flush=True)
            continue
        if getattr(stage, "final", False):
            # The runtime image: only check that what it takes from the build exists.
            if keyword == "COPY" and rest.startswith("--from="):
                words = shlex.split(rest)
                source_stage = stages[words[0].removeprefix("--from=")]
                for source in words[1:-1]:
                    if not source_stage.path(source).exists():
                        sys.exit(f"the runtime stage copies {source} from {source_stage.name}, which has none")
            continue
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            stage.env[name] = given.get(name, global_args.get(name, default.strip('"')))
        elif keyword == "ENV":
            for assignment in shlex.split(rest):
                name, _, value = assignment.partition("=")
                stage.env[name] = expand(value, stage.env)
        elif keyword == "SHELL":
            stage.shell = json.loads(rest)
        elif keyword == "WORKDIR":
            stage.workdir = os.path.join(stage.workdir, rest)
            stage.path(".").mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            words = shlex.split(rest)
            source_stage = None
            if words[0].startswith("--from="):
                source_stage = stages[words.pop(0).removeprefix("--from=")]
            *sources, dest = words
            if source_stage:
                paths, ignore = [source_stage.path(s) for s in sources], lambda p: False
            else:
                paths, ignore = [ROOT / s for s in sources], context_ignore
            copy(paths, stage.path(dest), dest.endswith("/") or len(sources) > 1, ignore)
        elif keyword == "RUN":
            print(f"-- {rest}", flush=True)
            done = subprocess.run([*stage.shell, rest], cwd=stage.path("."), env=stage.env)
            if done.returncode != 0:
                sys.exit(f"Dockerfile, stage {stage.name}: `RUN {rest}` failed (exit {done.returncode})")
        elif keyword in ("LABEL", "EXPOSE", "USER", "HEALTHCHECK", "CMD", "ENTRYPOINT"):
            pass
        else:
            sys.exit(f"Dockerfile: {keyword} is not something this check knows how to run")
    print(f"Dockerfile build stages ran in {scratch}")


if __name__ == "__main__":
    main()
