"""Static checks of the Dockerfile and .dockerignore (no Docker engine here, so nothing is built).

The Dockerfile is parsed into instructions, and the image each engine variant gets is followed
through its stages (``FROM engine-${BLIP_ENGINE}``) with the build args at their defaults (or
overridden); that reading is tests/support/dockerfile.py. Each ``check_*`` returns readable
problems for a repo root; the tests want none for this repo, and each problem back from a
deliberately broken copy in a temp dir, so every check is shown to be able to fail.
"""
from __future__ import annotations

import ast
import functools
import json
import re
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import pytest

import config
from support.dockerfile import (CUDA_FLAVORS, TORCH_INDEX, Instruction, arg_default, base_image,
                                default_cuda_flavor, final_image, froms, hosts_for, parse,
                                runs_on, version)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("transformers", "lavis")
# What `docker build` must not upload: environments, downloaded models, caches.
MUST_IGNORE = (".git", ".venv", ".venv-lavis", "models", "models/x/model.safetensors",
               ".pytest_cache", ".hypothesis", "src/__pycache__", "tests/__pycache__")
PYTHON_SCRIPT = re.compile(r"\bpython[\d.]*\s+(?:-u\s+)?([\w./-]+\.py)\b")


# ----------------------------------------------------------------------------------------------
# the image's files: which repo file ends up at which image path
# ----------------------------------------------------------------------------------------------
@dataclass
class Copy:
    sources: list[str]  # repo paths
    dest: PurePosixPath  # absolute image path
    into_dir: bool  # dest is a directory (ends with "/" or several sources): files keep names
    index: int  # position in the image's instructions


def resolve(workdir: PurePosixPath, path: str) -> PurePosixPath:
    return workdir / path if not path.startswith("/") else PurePosixPath(path)


def walk(image: list[Instruction]) -> tuple[list[Copy], list[PurePosixPath]]:
    """The COPYs (from the build context) and the WORKDIR in force at each instruction."""
    copies, workdirs, workdir = [], [], PurePosixPath("/")
    for i, ins in enumerate(image):
        if ins.cmd == "WORKDIR":
            workdir = resolve(workdir, ins.args)
        workdirs.append(workdir)
        if ins.cmd in ("COPY", "ADD") and "--from" not in ins.args:
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            dest = words[-1]
            copies.append(Copy(words[:-1], resolve(workdir, dest),
                               dest.endswith("/") or len(words) > 2, i))
    return copies, workdirs


def repo_file_at(root: Path, image_path: PurePosixPath, copies: list[Copy],
                 before: int) -> Path | None:
    """The repo file a COPY earlier than instruction ``before`` put at ``image_path``."""
    for c in reversed([c for c in copies if c.index < before]):
        for src in c.sources:
            src_path = root / src
            if src_path.is_dir():  # its contents go into dest
                if image_path.is_relative_to(c.dest):
                    candidate = src_path / image_path.relative_to(c.dest)
                    if candidate.is_file():
                        return candidate
            elif src_path.is_file() and image_path == (
                    c.dest / src_path.name if c.into_dir else c.dest):
                return src_path
    return None


# ----------------------------------------------------------------------------------------------
# .dockerignore
# ----------------------------------------------------------------------------------------------
def ignore_patterns(root: Path) -> list[str]:
    path = root / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def glob_regex(glob: str) -> re.Pattern:
    """A .dockerignore glob: ``*`` and ``?`` stay within a path segment, ``**/`` spans any."""
    out, i = "", 0
    while i < len(glob):
        for token, regex in (("**/", "(?:.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
            if glob.startswith(token, i):
                out, i = out + regex, i + len(token)
                break
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out)


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, and a pattern that
    matches a directory excludes everything below it."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------
def check_copy_sources(root: Path, image: list[Instruction]) -> list[str]:
    patterns = ignore_patterns(root)
    problems = []
    for c in walk(image)[0]:
        for src in c.sources:
            matches = sorted(root.glob(src.rstrip("/"))) if src.strip("./") else [root]
            if not matches:
                problems.append(f"COPY {src}: no such file in the repo")
            elif is_ignored(src.rstrip("/"), patterns):
                problems.append(f"COPY {src}: excluded by .dockerignore, the build cannot see it")
    return problems


def check_python_scripts(root: Path, image: list[Instruction]) -> list[str]:
    """Every ``python X.py`` a RUN or the CMD runs was copied into the image before it."""
    copies, workdirs = walk(image)
    problems = []
    for i, ins in enumerate(image):
        if ins.cmd not in ("RUN", "CMD"):
            continue
        text = " ".join(json.loads(ins.args)) if ins.args.startswith("[") else ins.args
        for script in PYTHON_SCRIPT.findall(text):
            if repo_file_at(root, resolve(workdirs[i], script), copies, before=i) is None:
                problems.append(f"line {ins.line}: `python {script}`: no earlier COPY puts "
                                f"{resolve(workdirs[i], script)} in the image from the repo")
    return problems


def requirement_pin(path: Path, package: str) -> str | None:
    for line in path.read_text().splitlines():
        m = re.match(rf"{package}==(\S+)", line.strip())
        if m:
            return m.group(1)
    return None


def check_torch_pin(root: Path, image: list[Instruction]) -> list[str]:
    """torch==X in the Dockerfile equals requirements.txt's pin and is installed before the
    `-r requirements.txt` that would otherwise resolve it."""
    want = requirement_pin(root / "requirements.txt", "torch")
    runs = [ins.args for ins in image if ins.cmd == "RUN"]
    pins = [p for text in runs for p in re.findall(r"\btorch==([\w.+]+)", text)]
    problems = []
    if not pins:
        problems.append("the Dockerfile installs no pinned torch (torch==X)")
    problems += [f"the Dockerfile pins torch=={p}, requirements.txt torch=={want}"
                 for p in pins if p != want]
    for text in runs:
        if "-r requirements.txt" in text and not (
                "torch==" in text and text.index("torch==") < text.index("-r requirements.txt")):
            problems.append("torch is not installed before `pip install -r requirements.txt`")
    return problems


def check_requirement_files(root: Path, image: list[Instruction]) -> list[str]:
    copies, workdirs = walk(image)
    problems = []
    for i, ins in enumerate(image):
        for name in re.findall(r"-r\s+([\w./-]+)", ins.args) if ins.cmd == "RUN" else []:
            if repo_file_at(root, resolve(workdirs[i], name), copies, before=i) is None:
                problems.append(f"line {ins.line}: `-r {name}`: not copied from the repo first")
    return problems


def check_cmd(root: Path, image: list[Instruction]) -> list[str]:
    """CMD (exec form) runs src/handler.py with python, from a WORKDIR holding test_input.json."""
    copies, workdirs = walk(image)
    cmds = [(i, ins) for i, ins in enumerate(image) if ins.cmd == "CMD"]
    if not cmds:
        return ["no CMD"]
    i, ins = cmds[-1]
    try:
        argv = json.loads(ins.args)
    except ValueError:
        return [f"CMD {ins.args}: use the exec form, e.g. [\"python\", \"-u\", \"src/handler.py\"]"]
    problems = []
    if not (argv and argv[0].startswith("python") and "src/handler.py" in argv):
        problems.append(f"CMD {argv} does not run src/handler.py with python")
    wanted = resolve(workdirs[i], "test_input.json")
    if repo_file_at(root, wanted, copies, before=len(image)) is None:
        problems.append(f"{wanted} (read by `python src/handler.py`) is not copied from the repo")
    return problems


def lavis_model_values(root: Path) -> set[str]:
    """The real-model BLIP_MODEL values the LAVIS engine accepts, read without importing it."""
    tree = ast.parse((root / "src" / "engines" / "lavis_engine.py").read_text())
    consts = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)
              and isinstance(node.value, ast.Constant)}
    return {config.DEFAULT_MODEL, consts.get("MODEL_TYPE", config.DEFAULT_MODEL)}


def fetch_runs(image: list[Instruction]) -> list[tuple[int, Instruction]]:
    return [(i, ins) for i, ins in enumerate(image)
            if ins.cmd == "RUN" and "fetch_model.py" in ins.args]


def fetch_out_dir(image: list[Instruction]) -> tuple[int, PurePosixPath | None]:
    """(position, --out) of the transformers fetch_model.py RUN."""
    workdirs = walk(image)[1]
    for i, ins in fetch_runs(image):
        words = shlex.split(ins.args)
        if "--engine" in words and words[words.index("--engine") + 1] == "lavis":
            continue
        if "--out" not in words:
            return i, None
        return i, resolve(workdirs[i], words[words.index("--out") + 1])
    return -1, None


def final_env(image: list[Instruction]) -> list[tuple[int, str, str]]:
    """(position, name, value) of every ENV setting, in order."""
    out = []
    for i, ins in enumerate(image):
        if ins.cmd == "ENV":
            words = shlex.split(ins.args)
            pairs = [w.partition("=") for w in words] if "=" in words[0] else \
                [(words[0], "=", " ".join(words[1:]))]
            out += [(i, name, value) for name, _, value in pairs]
    return out


def check_env(root: Path, image: list[Instruction], engine: str) -> list[str]:
    env = final_env(image)
    value = {name: v for _, name, v in env}
    problems = []
    if value.get("BLIP_ENGINE") != engine:
        problems.append(f"ENV BLIP_ENGINE is {value.get('BLIP_ENGINE')!r}, built for {engine!r}")
    fetch_at = max((i for i, _ in fetch_runs(image)), default=-1)
    offline_at = [i for i, name, v in env if name == "HF_HUB_OFFLINE" and v == "1"]
    if not offline_at:
        problems.append("ENV HF_HUB_OFFLINE=1 is not set: the worker would try the network")
    elif min(offline_at) < fetch_at:
        problems.append("ENV HF_HUB_OFFLINE=1 comes before the fetch_model.py RUN: the build "
                        "could not download the model")
    if engine == "transformers":
        i, out = fetch_out_dir(image)
        if i < 0:
            problems.append("no RUN of builder/fetch_model.py for the transformers engine")
        elif out is None:
            problems.append(f"line {image[i].line}: pass --out to fetch_model.py explicitly")
        elif value.get("BLIP_MODEL") != str(out):
            problems.append(f"ENV BLIP_MODEL={value.get('BLIP_MODEL')} but fetch_model.py "
                            f"writes {out}")
    elif value.get("BLIP_MODEL", config.DEFAULT_MODEL) not in lavis_model_values(root):
        problems.append(f"ENV BLIP_MODEL={value.get('BLIP_MODEL')} is refused by the LAVIS "
                        f"engine (accepts {sorted(lavis_model_values(root))})")
    return problems


def check_dockerignore(root: Path) -> list[str]:
    patterns = ignore_patterns(root)
    return [f".dockerignore does not exclude {p}" for p in MUST_IGNORE
            if not is_ignored(p, patterns)]


def check_build_arg_defaults(root: Path) -> list[str]:
    values = {}
    for ins in parse((root / "Dockerfile").read_text()):
        if ins.cmd == "ARG":
            name, default = arg_default(ins.args)
            if default is not None:
                values.setdefault(name, set()).add(default)
    want = {"BLIP_ENGINE": {"transformers"}, "BLIP_MODEL_REPO": {config.DEFAULT_MODEL}}
    return [f"ARG {name} defaults to {sorted(values.get(name, []))}, expected {sorted(v)}"
            for name, v in want.items() if values.get(name) != v]


# ----------------------------------------------------------------------------------------------
# the CUDA flavour: one build arg names it, and everything that depends on it agrees
# (the flavours themselves: support.dockerfile.CUDA_FLAVORS)
# ----------------------------------------------------------------------------------------------
def torch_installs(image: list[Instruction]) -> list[tuple[int, str]]:
    """(position, command) of every `pip install` of torch (and torchvision)."""
    return [(i, " ".join(seg.split())) for i, ins in enumerate(image) if ins.cmd == "RUN"
            for seg in re.split(r"&&|\|\||;", ins.args)
            if "pip install" in seg and "torch" in seg]


def run_check(script: str, env: dict[str, str]) -> int:
    """Exit status of a RUN's shell command, with a stand-in `python` that prints
    $FAKE_TORCH_CUDA (the check asks torch.version.cuda, and no CUDA torch is installed here)."""
    return _run_check(script, tuple(sorted(env.items())))


@functools.lru_cache(maxsize=None)
def _run_check(script: str, env_items: tuple[tuple[str, str], ...]) -> int:
    env = dict(env_items)
    with tempfile.TemporaryDirectory() as bin_dir:
        fake = Path(bin_dir) / "python"
        fake.write_text('#!/bin/sh\necho "$FAKE_TORCH_CUDA"\n')
        fake.chmod(0o755)
        return subprocess.run(["sh", "-c", script], env={
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env},
            capture_output=True).returncode


def check_build_checks(image: list[Instruction], flavor: str) -> list[str]:
    """The build stops when the base image's CUDA_VERSION, or the installed torch's CUDA, is not
    the flavour's: both RUN checks are run here with the right and a wrong version."""
    facts, problems = CUDA_FLAVORS[flavor], []
    other = next(f for f in CUDA_FLAVORS.values() if f.cuda != facts.cuda)
    installs = [i for i, _ in torch_installs(image)]
    checks = {
        "CUDA_VERSION": ("the base image's CUDA_VERSION", lambda f: {
            "CUDA_VERSION": f.base.split(":")[1].split("-")[0]}),
        "torch.version.cuda": ("the installed torch's CUDA", lambda f: {
            "FAKE_TORCH_CUDA": f.cuda}),
    }
    for marker, (what, env_for) in checks.items():
        found = [(i, ins) for i, ins in enumerate(image) if ins.cmd == "RUN" and marker in ins.args
                 and "pip install" not in ins.args]
        if not found:
            problems.append(f"no RUN checks {what} against CUDA_FLAVOR")
            continue
        i, ins = found[0]
        env = {"CUDA_FLAVOR": flavor}
        if run_check(ins.args, {**env, **env_for(facts)}) != 0:
            problems.append(f"line {ins.line}: the check of {what} fails for the right version")
        if run_check(ins.args, {**env, **env_for(other)}) == 0:
            problems.append(f"line {ins.line}: the check of {what} does not stop the build when "
                            f"it is {other.cuda}")
        if marker == "CUDA_VERSION" and installs and i > min(installs):
            problems.append(f"line {ins.line}: check the base image before installing torch")
        if marker == "torch.version.cuda" and installs and i < max(installs):
            problems.append(f"line {ins.line}: torch's CUDA is checked before torch is installed")
    return problems


def readme_section(root: Path, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", (root / "README.md").read_text(),
                  re.S | re.M)
    return m.group(1) if m else ""


def check_readme_hosts(root: Path, default: str) -> list[str]:
    """README's "Building and deploying" has a row per flavour (| `cuXXX` | CUDA X.Y | host
    versions | ...) naming the hosts it runs on, the default marked, and the build arg of each
    other flavour."""
    section = readme_section(root, "Building and deploying")
    rows = {m.group(1): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if (m := re.match(r"\| `(cu\d+)`", line))}
    problems = []
    for flavor, facts in CUDA_FLAVORS.items():
        cells = rows.get(flavor)
        if not cells or len(cells) < 3:
            problems.append(f"README (Building and deploying) has no row for {flavor}")
            continue
        if re.findall(r"\b\d+\.\d+\b", cells[1]) != [facts.cuda]:
            problems.append(f"README: {flavor} row says torch is built for {cells[1]!r}, not "
                            f"CUDA {facts.cuda}")
        hosts = re.findall(r"\b\d+\.\d+\b", cells[2])
        if sorted(hosts, key=version) != sorted(hosts_for(flavor), key=version):
            problems.append(f"README: {flavor} runs on hosts {hosts}, expected "
                            f"{hosts_for(flavor)}")
        if ("(default)" in cells[0]) != (flavor == default):
            problems.append(f"README: the {flavor} row is {'' if flavor == default else 'not '}"
                            f"the default (ARG CUDA_FLAVOR={default})")
        if flavor != default and f"--build-arg CUDA_FLAVOR={flavor}" not in section:
            problems.append(f"README (Building and deploying) does not show "
                            f"`--build-arg CUDA_FLAVOR={flavor}`")
    return problems


def check_cuda_flavor(root: Path) -> list[str]:
    """One build arg (CUDA_FLAVOR) names the flavour; for each known one, the base image is its
    known-good pair and torch (and torchvision) come from its wheel index, and the build checks
    both; hub.json's allowedCudaVersions and README's host list follow the default."""
    default = default_cuda_flavor(root)
    if default not in CUDA_FLAVORS:
        return [f"ARG CUDA_FLAVOR (before the first FROM) defaults to {default!r}, not one of "
                f"the known flavours {sorted(CUDA_FLAVORS)}"]
    problems = []
    table = {alias[len("cuda-"):]: image for image, alias in froms(root)
             if alias and alias.startswith("cuda-")}
    if set(table) != set(CUDA_FLAVORS):
        problems.append(f"the Dockerfile's cuda-<flavour> stages are {sorted(table)}, the known "
                        f"flavours {sorted(CUDA_FLAVORS)}")
    for image_name, _ in froms(root):
        if image_name.startswith("nvidia/cuda:") and "-base-" not in image_name:
            problems.append(f"FROM {image_name}: use the base flavour of nvidia/cuda (torch's "
                            "wheels bring their own CUDA libraries)")
    for flavor, facts in CUDA_FLAVORS.items():
        for engine in VARIANTS:
            tag = f"[{engine}, CUDA_FLAVOR={flavor}]"
            base = base_image(root, engine, CUDA_FLAVOR=flavor)
            if base != facts.base:
                problems.append(f"{tag} the image is built on {base}, not {facts.base}")
            image = final_image(root, engine, CUDA_FLAVOR=flavor)
            installs = torch_installs(image)
            if not installs:
                problems.append(f"{tag} no `pip install` of torch")
            problems += [f"{tag} `{cmd}` does not install from {TORCH_INDEX}{flavor}"
                         for _, cmd in installs if f"--index-url {TORCH_INDEX}{flavor} " not in cmd]
            problems += [f"{tag} {p}" for p in check_build_checks(image, flavor)]
    hub = json.loads((root / ".runpod" / "hub.json").read_text())
    allowed = hub["config"].get("allowedCudaVersions")
    if allowed != hosts_for(default):
        problems.append(f".runpod/hub.json allowedCudaVersions is {allowed}, but the default "
                        f"{default} image runs on {hosts_for(default)}")
    return problems + check_readme_hosts(root, default)


def problems(root: Path) -> list[str]:
    """Every check, for both engines (and a non-default model repo), as readable lines."""
    found = check_dockerignore(root) + check_build_arg_defaults(root)
    for engine in VARIANTS:
        image = final_image(root, engine)
        for check in (check_copy_sources, check_python_scripts, check_requirement_files,
                      check_cmd):
            found += [f"[{engine}] {p}" for p in check(root, image)]
        found += [f"[{engine}] {p}" for p in check_env(root, image, engine)]
    other = final_image(root, "transformers", BLIP_MODEL_REPO="someone/other-blip2")
    found += [f"[BLIP_MODEL_REPO=someone/other-blip2] {p}"
              for p in check_env(root, other, "transformers")]
    found += [f"[transformers] {p}" for p in check_torch_pin(root, final_image(root,
                                                                               "transformers"))]
    return found + check_cuda_flavor(root)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def test_the_dockerfile_passes_every_check():
    assert problems(ROOT) == []


def test_parser_follows_the_stage_chain_of_each_engine():
    for engine in VARIANTS:
        image = final_image(ROOT, engine)
        assert image[-1].cmd == "CMD" and json.loads(image[-1].args) == [
            "python", "-u", "src/handler.py"]
        assert [v for _, n, v in final_env(image) if n == "BLIP_ENGINE"] == [engine]
    lavis = final_image(ROOT, "lavis")
    assert "requirements-lavis.txt" in " ".join(i.args for i in lavis if i.cmd == "RUN")


def test_cuda_flavour_facts():
    """A build runs on its CUDA version's hosts and newer ones; a GPU runs kernels built for its
    major version and an older or equal minor one."""
    assert hosts_for("cu126") == ["13.0", "12.9", "12.8", "12.7", "12.6"]
    assert hosts_for("cu130") == ["13.0"]
    assert runs_on("cu126", "8.9") and runs_on("cu126", "9.0") and runs_on("cu126", "8.0")
    assert not runs_on("cu126", "12.0") and not runs_on("cu126", "10.0")
    assert runs_on("cu130", "12.0") and not runs_on("cu130", "6.1")


def test_ignore_matching():
    pats = ["models", "**/__pycache__", "*.pyc", "!keep.pyc", "/out/"]
    assert is_ignored("models/a/b.safetensors", pats) and is_ignored("src/x/__pycache__/y", pats)
    assert is_ignored("__pycache__/y", pats) and is_ignored("a.pyc", pats)
    assert not is_ignored("keep.pyc", pats) and not is_ignored("src/a.pyc", pats)
    assert is_ignored("out/z", pats) and not is_ignored("src/models.py", pats)


def copy_repo(tmp_path: Path) -> Path:
    """What the checks read, copied: the Dockerfile's inputs and the files it names."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Dockerfile", ".dockerignore", "requirements.txt", "requirements-lavis.txt",
                 "test_input.json", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    for name in ("src", "builder", ".runpod"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def edit(path: str, old: str, new: str, count: int = 1) -> Callable[[Path], None]:
    """Replace the first `count` occurrences (-1: all)."""
    def apply(root: Path) -> None:
        text = (root / path).read_text()
        assert old in text, f"{old!r} not in {path}: update this test's mutation"
        (root / path).write_text(text.replace(old, new, count))
    return apply


def remove(path: str) -> Callable[[Path], None]:
    return lambda root: (root / path).unlink(missing_ok=True)


MUTATIONS = {
    "torch pin drifts in the Dockerfile": (
        edit("Dockerfile", "torch==2.13.0 \\\n", "torch==0.0.1+ \\\n"),
        "the Dockerfile pins torch==0.0.1+"),
    "torch pin drifts in requirements.txt": (
        edit("requirements.txt", "torch==", "torch==9.9.9\n# was "),
        "requirements.txt torch==9.9.9"),
    "torch installed after the requirements": (
        edit("Dockerfile", "transformers) pip install --index-url",
             "transformers) pip install -r requirements.txt && pip install --index-url"),
        "torch is not installed before"),
    "CUDA_FLAVOR defaults to a flavour torch has no build for": (
        edit("Dockerfile", "ARG CUDA_FLAVOR=cu126", "ARG CUDA_FLAVOR=cu128"),
        "ARG CUDA_FLAVOR (before the first FROM) defaults to 'cu128'"),
    "a base image that is not its flavour's": (
        edit("Dockerfile", "nvidia/cuda:13.0.2-base-ubuntu22.04 AS cuda-cu130",
             "nvidia/cuda:12.8.1-base-ubuntu22.04 AS cuda-cu130"),
        "[transformers, CUDA_FLAVOR=cu130] the image is built on nvidia/cuda:12.8.1"),
    "a flavour without its stage": (
        edit("Dockerfile", "FROM nvidia/cuda:13.0.2-base-ubuntu22.04 AS cuda-cu130\n", ""),
        "the Dockerfile's cuda-<flavour> stages are ['cu126']"),
    "the runtime image instead of base": (
        edit("Dockerfile", "12.6.3-base-ubuntu22.04", "12.6.3-runtime-ubuntu22.04", -1),
        "use the base flavour of nvidia/cuda"),
    "torch from the default index": (
        edit("Dockerfile", "transformers) pip install --index-url "
             "https://download.pytorch.org/whl/${CUDA_FLAVOR}", "transformers) pip install"),
        "transformers) pip install torch==2.13.0` does not install from "
        "https://download.pytorch.org/whl/cu126"),
    "the LAVIS torch index ignores CUDA_FLAVOR": (
        edit("Dockerfile", "lavis) pip install --index-url https://download.pytorch.org/whl/"
             "${CUDA_FLAVOR}", "lavis) pip install --index-url "
             "https://download.pytorch.org/whl/cu126"),
        "[lavis, CUDA_FLAVOR=cu130] `lavis) pip install --index-url "
        "https://download.pytorch.org/whl/cu126"),
    "the base image's CUDA is not checked": (
        edit("Dockerfile", 'RUN test "cu$(echo "$CUDA_VERSION"',
             'RUN true || test "cu$(echo "$CUDA_VERSION"'),
        "the check of the base image's CUDA_VERSION does not stop the build"),
    "torch's CUDA is not checked": (
        edit("Dockerfile", '&& test "cu$(echo "$torch_cuda"',
             '&& true || test "cu$(echo "$torch_cuda"'),
        "the check of the installed torch's CUDA does not stop the build"),
    "hub.json allows hosts the image cannot run on": (
        edit(".runpod/hub.json", '"12.6"', '"12.6",\n      "12.5"'),
        "allowedCudaVersions is ['13.0', '12.9', '12.8', '12.7', '12.6', '12.5']"),
    "README's host list drifts": (
        edit("README.md", "CUDA 12.6, 12.7, 12.8, 12.9 or 13.0", "CUDA 12.8, 12.9 or 13.0"),
        "README: cu126 runs on hosts ['12.8', '12.9', '13.0']"),
    "README does not show the other flavour's build arg": (
        edit("README.md", "--build-arg CUDA_FLAVOR=cu130", "--build-arg CUDA_FLAVOR=cu13", -1),
        "does not show `--build-arg CUDA_FLAVOR=cu130`"),
    "a copied file is missing": (remove("test_input.json"), "COPY test_input.json: no such"),
    "the fetch runs before builder/ is copied": (
        edit("Dockerfile", "COPY builder/ builder/", "COPY src/ builder-not-here/"),
        "`python builder/fetch_model.py`: no earlier COPY"),
    "a requirements file is not copied": (
        edit("Dockerfile", "COPY requirements.txt requirements-lavis.txt ./",
             "COPY requirements.txt ./"),
        "`-r requirements-lavis.txt`: not copied"),
    "CMD runs something else": (
        edit("Dockerfile", '"src/handler.py"]', '"src/main.py"]'), "does not run src/handler.py"),
    "CMD in shell form": (
        edit("Dockerfile", 'CMD ["python", "-u", "src/handler.py"]',
             "CMD python -u src/handler.py"), "use the exec form"),
    "WORKDIR moves away from test_input.json": (
        edit("Dockerfile", "CMD [", "WORKDIR /elsewhere\nCMD ["), "/elsewhere/test_input.json"),
    "HF_HUB_OFFLINE missing": (edit("Dockerfile", "HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0"),
                               "HF_HUB_OFFLINE=1 is not set"),
    "offline before the download": (
        edit("Dockerfile", "ENV DEBIAN_FRONTEND=noninteractive",
             "ENV HF_HUB_OFFLINE=1 DEBIAN_FRONTEND=noninteractive"),
        "comes before the fetch_model.py RUN"),
    "BLIP_MODEL is not where the model is written": (
        edit("Dockerfile", "ENV BLIP_MODEL=/models/", "ENV BLIP_MODEL=/weights/"),
        "but fetch_model.py writes /models/Salesforce/blip2-opt-2.7b-coco"),
    "the model dir ignores BLIP_MODEL_REPO": (
        edit("Dockerfile", '--out "/models/$BLIP_MODEL_REPO"',
             '--out "/models/Salesforce/blip2-opt-2.7b-coco"'),
        "[BLIP_MODEL_REPO=someone/other-blip2] ENV BLIP_MODEL=/models/someone/other-blip2 but"),
    "LAVIS image with a BLIP_MODEL it refuses": (
        edit("Dockerfile", "ENV BLIP_MODEL=caption_coco_opt2.7b", "ENV BLIP_MODEL=/models/x"),
        "is refused by the LAVIS engine"),
    "wrong default model": (
        edit("Dockerfile", "BLIP_MODEL_REPO=Salesforce/blip2-opt-2.7b-coco",
             "BLIP_MODEL_REPO=Salesforce/blip2-opt-6.7b"),
        "ARG BLIP_MODEL_REPO defaults to"),
    ".dockerignore lets the venv in": (edit(".dockerignore", "\n.venv\n", "\n"),
                                       "does not exclude .venv"),
    ".dockerignore hides the source": (
        edit(".dockerignore", "\n.venv\n", "\n.venv\nsrc\n"), "COPY src/: excluded"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_check_fails_on_a_broken_copy(name, tmp_path):
    mutate, expected = MUTATIONS[name]
    root = copy_repo(tmp_path)
    assert problems(root) == problems(ROOT)  # the copy is faithful before the edit
    mutate(root)
    found = problems(root)
    assert any(expected in p for p in found), found
