"""The Dockerfile, read as Docker reads it, and the CUDA flavour facts its checks rely on.

``parse`` gives the instructions (continuation lines joined, comments skipped); ``stage_chain``,
``image_instructions``, ``final_image`` and ``base_image`` follow the stages an engine variant
builds (``FROM engine-${BLIP_ENGINE}``) with the build args at their defaults or overridden.
``CUDA_FLAVORS`` are the known-good torch builds and their base images; ``runs_on`` and
``hosts_for`` say which GPUs and RunPod hosts a flavour serves; ``default_cuda_flavor`` and
``froms`` read what the Dockerfile picks. Used by test_dockerfile (the checks) and test_hub.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


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


def stage_chain(instructions: list[Instruction], build_args: dict[str, str] | None = None
                ) -> tuple[dict[str, str], list[tuple[str, str | None, list[Instruction]]]]:
    """The global ARG values and the stages that make the final image, base stage first, as
    (FROM image or stage, alias, body); chain[0][0] is the image the build starts from."""
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
    return globals_, chain


def image_instructions(instructions: list[Instruction],
                       build_args: dict[str, str] | None = None) -> list[Instruction]:
    """The instructions that make the final image, stage chain followed (base stage first),
    with ARG values substituted as Docker would (a stage's ARG without a default takes the
    global one; --build-arg overrides)."""
    build_args = build_args or {}
    globals_, chain = stage_chain(instructions, build_args)
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


def base_image(root: Path, engine: str, **build_args: str) -> str:
    """The image the final image is built on (the first FROM of its stage chain)."""
    return stage_chain(parse((root / "Dockerfile").read_text()),
                       {"BLIP_ENGINE": engine, **build_args})[1][0][0]


@dataclass(frozen=True)
class Flavor:
    cuda: str  # the CUDA version torch's build is for (torch.version.cuda)
    base: str  # its base image
    archs: tuple[str, ...]  # the compute capabilities its kernels are built for


# The known-good pairs (flavour -> base image). Flavours: the CUDA builds in PyTorch's release
# matrix for torch 2.13 and 2.14 (12.6 and 13.0; 13.2 too, experimental in 2.13; no 12.8 or 12.9
# since 2.12), each on PyTorch's index at download.pytorch.org/whl/<flavour>. (The default
# index's torch==2.13.0 and 2.14.1 are the CUDA 13.0 builds: their metadata requires
# cuda-toolkit==13.0.3.) Architectures: PyTorch's CUDA support matrix for 2.12 to 2.14, Linux
# x86_64. Base: nvidia/cuda's smallest ("base") image of the same CUDA version.
CUDA_FLAVORS = {
    "cu126": Flavor("12.6", "nvidia/cuda:12.6.3-base-ubuntu22.04",
                    ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0")),
    "cu130": Flavor("13.0", "nvidia/cuda:13.0.2-base-ubuntu22.04",
                    ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")),
}
# The host CUDA versions RunPod schedules on (the values allowedCudaVersions takes), newest first.
RUNPOD_CUDA_VERSIONS = ("13.0", "12.9", "12.8", "12.7", "12.6", "12.5", "12.4", "12.3", "12.2",
                        "12.1", "12.0", "11.8")
TORCH_INDEX = "https://download.pytorch.org/whl/"


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def hosts_for(flavor: str) -> list[str]:
    """The RunPod host CUDA versions a flavour runs on: its own and every newer one (a driver
    runs what was built for its CUDA version or an older one)."""
    return [v for v in RUNPOD_CUDA_VERSIONS if version(v) >= version(CUDA_FLAVORS[flavor].cuda)]


def runs_on(flavor: str, capability: str) -> bool:
    """Whether a GPU of compute capability X.y has kernels in the flavour's torch: those built
    for X.z with z <= y run on it (same major version)."""
    major, minor = version(capability)
    return any(a == major and b <= minor for a, b in map(version, CUDA_FLAVORS[flavor].archs))


def froms(root: Path) -> list[tuple[str, str | None]]:
    """(image or stage, alias) of every FROM, global ARGs substituted."""
    out, values = [], {}
    for ins in parse((root / "Dockerfile").read_text()):
        if ins.cmd == "ARG" and not out:
            name, default = arg_default(ins.args)
            values[name] = default or ""
        elif ins.cmd == "FROM":
            words = substitute(ins.args, values).split()
            out.append((words[0], words[2] if len(words) > 2 else None))
    return out


def default_cuda_flavor(root: Path) -> str | None:
    for ins in parse((root / "Dockerfile").read_text()):
        if ins.cmd == "FROM":
            return None
        if ins.cmd == "ARG" and arg_default(ins.args)[0] == "CUDA_FLAVOR":
            return arg_default(ins.args)[1]
    return None
