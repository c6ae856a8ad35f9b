"""Static checks of the Dockerfile and .dockerignore (no Docker engine here, so nothing is built).

The Dockerfile is parsed into instructions, and the image each engine variant gets is followed
through its stages (``FROM engine-${BLIP_ENGINE}``) with the build args at their defaults (or
overridden). Each ``check_*`` returns readable problems for a repo root; the tests want none for
this repo, and each problem back from a deliberately broken copy in a temp dir, so every check
is shown to be able to fail.
"""
from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import pytest

import config

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("transformers", "lavis")
# What `docker build` must not upload: environments, downloaded models, caches.
MUST_IGNORE = (".git", ".venv", ".venv-lavis", "models", "models/x/model.safetensors",
               ".pytest_cache", ".hypothesis", "src/__pycache__", "tests/__pycache__")
PYTHON_SCRIPT = re.compile(r"\bpython[\d.]*\s+(?:-u\s+)?([\w./-]+\.py)\b")
VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined (variables: see image_instructions)
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines skipped (also inside a
    continued instruction, as Docker does)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            cmd, _, args = pending.strip().partition(" ")
            out.append(Instruction(cmd.upper(), args.strip(), start))
            pending = ""
    return out


def substitute(text: str, values: dict[str, str]) -> str:
    return VAR.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def arg_default(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), default.strip().strip('"') if eq else None


def image_instructions(instructions: list[Instruction],
                       build_args: dict[str, str] | None = None) -> list[Instruction]:
    """The instructions that make the final image, stage chain followed (base stage first),
    with ARG values substituted as Docker would (a stage's ARG without a default takes the
    global one; --build-arg overrides)."""
    build_args = build_args or {}
    globals_: dict[str, str] = {}
    stages: list[tuple[str, str | None, list[Instruction]]] = []  # (from, alias, body)
    for ins in instructions:
        if ins.cmd == "FROM":
            words = substitute(ins.args, globals_).split()
            alias = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append((words[0], alias, []))
        elif not stages and ins.cmd == "ARG":
            name, default = arg_default(ins.args)
            globals_[name] = build_args.get(name, default or "")
        elif stages:
            stages[-1][2].append(ins)
    chain = [stages[-1]]
    aliases = {alias: (base, alias, body) for base, alias, body in stages if alias}
    while chain[0][0] in aliases:
        chain.insert(0, aliases[chain[0][0]])
    flat: list[Instruction] = []
    for _, _, body in chain:
        values = dict(build_args)
        for ins in body:
            if ins.cmd == "ARG":
                name, default = arg_default(ins.args)
                values[name] = build_args.get(name, default if default is not None
                                              else globals_.get(name, ""))
            flat.append(Instruction(ins.cmd, substitute(ins.args, values), ins.line))
    return flat


def final_image(root: Path, engine: str, **build_args: str) -> list[Instruction]:
    return image_instructions(parse((root / "Dockerfile").read_text()),
                              {"BLIP_ENGINE": engine, **build_args})


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
    tree = ast.parse((root / "src" / "engine_lavis.py").read_text())
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
    return found


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
                 "test_input.json"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    for name in ("src", "builder"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def edit(path: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        text = (root / path).read_text()
        assert old in text, f"{old!r} not in {path}: update this test's mutation"
        (root / path).write_text(text.replace(old, new, 1))
    return apply


def remove(path: str) -> Callable[[Path], None]:
    return lambda root: (root / path).unlink(missing_ok=True)


MUTATIONS = {
    "torch pin drifts in the Dockerfile": (
        edit("Dockerfile", "pip install torch==", "pip install torch==0.0.1+"),
        "the Dockerfile pins torch==0.0.1+"),
    "torch pin drifts in requirements.txt": (
        edit("requirements.txt", "torch==", "torch==9.9.9\n# was "),
        "requirements.txt torch==9.9.9"),
    "torch installed after the requirements": (
        edit("Dockerfile", "pip install torch==2.13.0 && pip install -r requirements.txt",
             "pip install -r requirements.txt && pip install torch==2.13.0"),
        "torch is not installed before"),
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
