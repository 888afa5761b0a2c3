"""Static checks of deploy/Dockerfile and of the build context that .dockerignore leaves."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deploy_checks import ROOT


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    base: str
    alias: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Split a Dockerfile into global ARG defaults and build stages.

    Handles comments, parser directives and backslash line continuations; heredocs
    (`RUN <<EOF`) are not supported.
    """
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, arguments = logical.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), start)
        logical = ""
        if instruction.keyword == "FROM":
            words = [word for word in instruction.arguments.split() if not word.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0] if words else "", alias, start))
        elif not stages:
            if instruction.keyword == "ARG":
                name, _, default = instruction.arguments.partition("=")
                global_args[name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def _expand_args(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: args.get(match[1], match[0]), value)


def _env_pairs(arguments: str) -> dict[str, str]:
    words = shlex.split(arguments)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}  # legacy form: ENV KEY value
    return dict(word.partition("=")[::2] for word in words)


def _exec_form(arguments: str) -> list[str] | None:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


# Packages and tools that compile code; none belongs in the final image.
_BUILD_TOOLS = re.compile(
    r"\b(build-essential|gcc|g\+\+|cpp|clang|make|cmake|libc6-dev|[\w.+-]+-dev|python3-dev|rustc|cargo|"
    r"musl-dev|linux-headers|pkg-config)\b"
)
_INSTALL = re.compile(r"\b(apt-get|apt|apk|dnf|yum|microdnf)\s+(-\S+\s+)*(install|add)\b")


def check_dockerfile(text: str) -> list[str]:
    """Check the container properties the deployment relies on; return the problems found."""
    global_args, stages = parse_dockerfile(text)
    if not stages:
        return ["no FROM instruction"]
    problems = []
    if len(stages) < 2:
        problems.append("not a multi-stage build: build tools would stay in the image")

    final = stages[-1]
    aliases = {stage.alias: stage for stage in stages if stage.alias}
    base_stage = final
    while base_stage.base in aliases and aliases[base_stage.base] is not base_stage:
        base_stage = aliases[base_stage.base]
    base = _expand_args(base_stage.base, global_args)
    if not re.match(r"^(docker\.io/)?(library/)?python:[^@]*-slim\b", base):
        problems.append(f"final stage base image {base!r} is not a slim Python image (python:X.Y-slim-...)")

    users = [instruction for instruction in final.instructions if instruction.keyword == "USER"]
    if not users:
        problems.append("final stage sets no USER, so the image runs as root")
    else:
        user = users[-1].arguments.split(":")[0]
        if user in ("0", "root"):
            problems.append(f"final stage USER {users[-1].arguments} is root")
        elif not user.isdigit():
            problems.append(
                f"final stage USER {user!r} is not numeric; Kubernetes cannot check runAsNonRoot for a user name"
            )

    for instruction in final.instructions:
        if instruction.keyword == "RUN" and _INSTALL.search(instruction.arguments):
            tool = _BUILD_TOOLS.search(instruction.arguments)
            if tool:
                problems.append(f"line {instruction.line}: final stage installs build tool {tool[0]!r}")
        if instruction.keyword == "COPY" and "--from=" in instruction.arguments:
            if re.search(r"\s/usr/(bin|lib/gcc|libexec/gcc)\b", " " + instruction.arguments):
                problems.append(
                    f"line {instruction.line}: final stage copies compiler files from another stage"
                )

    environment: dict[str, str] = {}
    for instruction in final.instructions:
        if instruction.keyword == "ENV":
            environment.update(_env_pairs(instruction.arguments))
    if environment.get("PYTHONDONTWRITEBYTECODE") not in ("1", "true"):
        problems.append(
            "final stage does not set PYTHONDONTWRITEBYTECODE=1 (needed on a read-only root file system)"
        )

    entrypoints = [i for i in final.instructions if i.keyword == "ENTRYPOINT"]
    commands = [i for i in final.instructions if i.keyword == "CMD"]
    entrypoint = _exec_form(entrypoints[-1].arguments) if entrypoints else None
    command = _exec_form(commands[-1].arguments) if commands else None
    if (entrypoints and entrypoint is None) or (commands and command is None):
        problems.append("ENTRYPOINT and CMD must use the exec (JSON) form, so SIGTERM reaches Python")
    if entrypoint is None or len(entrypoint) < 2 or entrypoint[-1] != "-m" or "python" not in entrypoint[0]:
        problems.append(
            'ENTRYPOINT must be ["python", "-m"] so the command picks the module: '
            "`service` (API), `workers` (worker) or `service migrate`"
        )
    if command is None or command[:1] != ["service"]:
        problems.append('CMD must default to the API (["service"] or ["service", "serve"])')
    return problems


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Translate one .dockerignore pattern (Go filepath.Match plus `**`) into a regex."""
    out, index = "", 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            index += 2
            if pattern.startswith("/", index):
                index += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", index)
            if end == -1:
                out += re.escape(char)
            else:
                out += "[" + pattern[index + 1 : end].replace("!", "^", 1) + "]"
                index = end
        else:
            out += re.escape(char)
        index += 1
    return re.compile(f"^{out}$")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """Return (is_exception, regex) per pattern, in file order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exception, _pattern_regex(pattern)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Decide as Docker does: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    included = True
    for exception, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            included = exception
    return included


def _package_files() -> Iterator[Path]:
    for package in ("service", "workers", "sql"):
        for path in sorted((ROOT / package).rglob("*")):
            if "__pycache__" in path.parts or path.suffix == ".pyc" or path.is_dir():
                continue
            yield path


def check_build_context(dockerignore: str, dockerfile: str) -> list[str]:
    """Check that the build context contains what the image needs and none of the rest."""
    rules = dockerignore_rules(dockerignore)
    _, stages = parse_dockerfile(dockerfile)
    copied = []
    for stage in stages:
        for instruction in stage.instructions:
            if instruction.keyword in ("COPY", "ADD") and "--from=" not in instruction.arguments:
                words = [word for word in instruction.arguments.split() if not word.startswith("--")]
                copied += [posixpath.normpath(word) for word in words[:-1]]

    def copied_by_dockerfile(relative: str) -> bool:
        return any(relative == source or relative.startswith(source + "/") for source in copied)

    needed = {"pyproject.toml", "README.md"}
    for path in _package_files():
        needed.add(str(path.relative_to(ROOT)))
        if path.is_symlink():
            needed.add(os.path.relpath(path.resolve(), ROOT))
    problems = []
    for relative in sorted(needed):
        if not in_build_context(relative, rules):
            problems.append(f"{relative} is needed by the image but .dockerignore leaves it out")
        elif not copied_by_dockerfile(relative):
            problems.append(f"{relative} is needed by the image but no COPY in the Dockerfile copies it")
    for source in copied:
        if not (ROOT / source).exists():
            problems.append(f"the Dockerfile copies {source}, which does not exist")
    for unwanted in (
        ".git/config",
        ".venv/bin/python",
        "tests/data/real-manifests.jsonl",
        ".env",
        "deploy/compose.yaml",
        "service/__pycache__/app.cpython-311.pyc",
    ):
        if in_build_context(unwanted, rules):
            problems.append(f"{unwanted} would be sent to the Docker build context")
    return problems
