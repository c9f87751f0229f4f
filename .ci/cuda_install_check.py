"""Resolve the README's install commands as a Linux CUDA machine would, from the registry's own
metadata, and fail on any conflict.

The project's machines install torch's CPU build from a file on disk, which depends on no triton;
everywhere else on Linux the registry serves the CUDA build, which pins its own triton and CUDA
libraries. This check asks pip to resolve every `pip install` of the README's opening commands
together, for CPython 3.11 on manylinux x86_64, with pip's dry run (nothing is installed; pip
fetches the wheels it needs to read their metadata, ~2 GB, into a temporary folder deleted at the
end). A pin in constraints.txt that disagrees with the CUDA build's metadata fails here.

    python .ci/cuda_install_check.py [--constraints FILE] [--readme README.md]

--constraints replaces the `-c` file the README names (to show the check failing on a
deliberately conflicting pin).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# The oldest glibc among the wheels the tested set uses is 2.5 (manylinux1); the CUDA torch wheel
# needs 2.28. pip takes --platform literally, so every compatible tag is listed.
PLATFORMS = ([f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])


def readme_installs(readme: Path) -> list[list[str]]:
    """The arguments of every `pip install` in the README's opening commands (the first fenced
    block), one list per command line."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S)
    if block is None:
        raise SystemExit(f"{readme}: no ```bash block")
    installs = []
    for line in block.group(1).splitlines():
        if line.lstrip().startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    if not installs:
        raise SystemExit(f"{readme}: the opening block has no `pip install`")
    return installs


def project_requirements(spec: str) -> list[str]:
    """`.` or `.[a,b]`: the project's dependencies and those of the named extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.fullmatch(r"\.(?:\[(.*)\])?", spec)
    if extras is None:
        raise SystemExit(f"cannot read the install target {spec!r}")
    reqs = list(project["dependencies"])
    for extra in filter(None, (extras.group(1) or "").split(",")):
        reqs += project["optional-dependencies"][extra.strip()]
    return reqs


def resolve_args(installs: list[list[str]], constraints: Path | None) -> list[str]:
    """One pip argument list holding every requirement and constraint of the commands."""
    args: list[str] = []
    for words in installs:
        it = iter(words)
        for w in it:
            if w in ("-q", "--quiet"):
                continue
            if w == "-c":
                named = next(it)
                args += ["-c", str(constraints or ROOT / named)]
            elif w == "-e":
                args += project_requirements(next(it))
            elif w.startswith("."):
                args += project_requirements(w)
            elif w.startswith("-"):
                raise SystemExit(f"the check does not know the pip option {w!r}")
            else:
                args.append(w)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--constraints", type=Path, default=None)
    opts = parser.parse_args(argv)
    installs = readme_installs(opts.readme)
    reqs = resolve_args(installs, opts.constraints)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check",
               "install", "--dry-run",
               "--ignore-installed", "--no-cache-dir", "--only-binary=:all:",
               "--python-version", "3.11", *platform_args, "--target", str(Path(tmp) / "t"),
               "--report", str(report), *reqs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            print("\n".join(lines[-25:]), file=sys.stderr)
            print(f"FAILED: the README's install does not resolve for a Linux CUDA machine "
                  f"(pip exit {proc.returncode})", file=sys.stderr)
            return 1
        installed = {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())
                     ["install"]}
    torch = installed["torch"]["metadata"]
    pinned = [r for r in torch.get("requires_dist", []) if r.startswith("triton")]
    cuda = sorted(n for n in installed if n.startswith(("nvidia-", "cuda-")))
    print(f"OK: torch {torch['version']} (CUDA build: {len(cuda)} CUDA packages), its "
          f"{'; '.join(pinned) or 'no triton pin'}; resolved triton "
          f"{installed['triton']['metadata']['version']}; {len(installed)} packages, no conflict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
