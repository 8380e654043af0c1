"""Personas from their directory: one YAML file each, validated and hot-reloaded.

A broken file never takes a persona down: errors name the file, the field and the line, and a
broken edit of a file that loaded before keeps its last good version serving until it is fixed.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import ValidationError

from bot.core.personas import PERSONA_SUFFIXES, Persona, has_local_avatar
from bot.errors import PersonaError

logger = logging.getLogger(__name__)


class PersonaProblem(NamedTuple):
    """One thing wrong with a persona file; `line` is 1-based."""

    line: int | None
    field: str | None
    message: str

    def render(self, path: Path) -> str:
        where = f"{path}:{self.line}" if self.line is not None else str(path)
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {what}"


class PersonaFileError(PersonaError):
    """A persona file is broken. `path`, `line` and `field` describe its first problem."""

    def __init__(self, path: Path, problems: list[PersonaProblem]) -> None:
        if not problems:
            problems = [PersonaProblem(None, None, "invalid persona file")]
        self.path = path
        self.problems = problems
        self.line = problems[0].line
        self.field = problems[0].field
        super().__init__("\n".join(problem.render(path) for problem in problems))


def _fail(path: Path, line: int | None, field: str | None, message: str) -> PersonaFileError:
    return PersonaFileError(path, [PersonaProblem(line, field, message)])


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, None, None, f"not valid UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise _fail(path, None, None, f"cannot read file: {exc.strerror or exc}") from None


def _parse_yaml(path: Path, text: str) -> tuple[yaml.MappingNode, Any]:
    """The top-level mapping node (for line numbers) and the plain data built from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise _fail(path, 1, None, "file is empty; expected a mapping of persona fields")
        if not isinstance(node, yaml.MappingNode):
            kind = "list" if isinstance(node, yaml.SequenceNode) else "single value"
            message = f"expected a mapping of persona fields (key: value), got a {kind}"
            raise _fail(path, _line(node), None, message)
        return node, loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise _fail(path, line, None, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise _fail(path, None, None, f"YAML syntax error: {exc}") from None
    finally:
        loader.dispose()


def _field_name(loc: tuple[int | str, ...]) -> str | None:
    if not loc:
        return None
    name = str(loc[0])
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def _line_for(root: yaml.MappingNode, loc: tuple[int | str, ...]) -> int:
    """Line of the node a pydantic error `loc` points at, or of its nearest present parent."""
    node: yaml.Node = root
    line = _line(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((pair for pair in node.value if pair[0].value == str(part)), None)
            if found is None:
                break
            line, node = _line(found[0]), found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = _line(node)
        else:
            break
    return line


def _duplicate_keys(root: yaml.MappingNode) -> list[PersonaProblem]:
    first_seen: dict[str, int] = {}
    problems = []
    for key, _value in root.value:
        name = str(key.value)
        if name in first_seen:
            message = f"duplicate key (first set on line {first_seen[name]})"
            problems.append(PersonaProblem(_line(key), name, message))
        else:
            first_seen[name] = _line(key)
    return problems


def _avatar_missing(persona: Persona, path: Path) -> bool:
    return has_local_avatar(persona) and not (path.parent / persona.avatar).is_file()


def load_persona_file(path: Path) -> Persona:
    """Parse and validate one persona file; raise `PersonaFileError` listing every problem."""
    root, data = _parse_yaml(path, _read_text(path))
    problems = _duplicate_keys(root)
    persona: Persona | None = None
    try:
        persona = Persona.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            problems.append(PersonaProblem(_line_for(root, loc), _field_name(loc), error["msg"]))
    if persona is not None and persona.name != path.stem:
        message = f"{persona.name!r} must match the file name (expected {path.stem!r})"
        problems.append(PersonaProblem(_line_for(root, ("name",)), "name", message))
    if persona is not None and _avatar_missing(persona, path):
        message = f"no picture {persona.avatar!r} beside the persona file"
        problems.append(PersonaProblem(_line_for(root, ("avatar",)), "avatar", message))
    if problems or persona is None:
        problems.sort(key=lambda problem: problem.line or 0)
        raise PersonaFileError(path, problems)
    return persona


class PersonaRegistry:
    """The personas of one directory, keyed by name, with polling hot reload."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: dict[Path, tuple[int, int]] = {}
        self._good: dict[Path, Persona] = {}
        self._by_name: dict[str, Persona] = {}

    def load_all(self) -> list[PersonaError]:
        """(Re)load every file; keep the good personas, return the problems (unlogged)."""
        self._seen.clear()
        self._good.clear()
        return self._refresh(initial=True)

    def reload_changed(self) -> list[PersonaError]:
        """Reload new and changed files, drop deleted ones; return problems with the changes."""
        return self._refresh(initial=False)

    async def watch(self, interval: float) -> None:
        """Poll for changes every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_changed()
            except Exception:
                logger.exception("persona reload in %s failed", self.directory)

    def get(self, name: str) -> Persona:
        persona = self.find(name)
        if persona is None:
            raise KeyError(name)
        return persona

    def find(self, name: str) -> Persona | None:
        return self._by_name.get(name.strip().lower())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def all(self) -> list[Persona]:
        return [self._by_name[name] for name in self.names()]

    def default(self, preferred: str | None) -> Persona:
        """The preferred persona if loaded, else the first by name."""
        if not self._by_name:
            raise PersonaError(f"no personas loaded from {self.directory}")
        if preferred:
            persona = self.find(preferred)
            if persona is not None:
                return persona
            logger.warning("default persona %r is not loaded; using %r", preferred, self.names()[0])
        return self._by_name[self.names()[0]]

    def _scan(self) -> dict[Path, tuple[int, int]]:
        """Persona files in the directory with their (mtime_ns, size)."""
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PersonaError(
                f"cannot read personas directory {self.directory}: {reason}"
            ) from None
        found: dict[Path, tuple[int, int]] = {}
        for path in entries:
            if path.suffix.lower() not in PERSONA_SUFFIXES or path.name.startswith("."):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue  # deleted between listing and stat: treated as gone
            if path.is_file():
                found[path] = (stat.st_mtime_ns, stat.st_size)
        return found

    def _refresh(self, *, initial: bool) -> list[PersonaError]:
        try:
            current = self._scan()
        except PersonaError as exc:
            if not initial:
                logger.warning("%s; keeping the personas already loaded", exc)
            return [exc]
        changed = False
        for path in sorted(self._seen.keys() - current.keys()):
            del self._seen[path]
            gone = self._good.pop(path, None)
            changed = True
            if gone is not None:
                logger.warning("persona %r removed: %s was deleted", gone.name, path)
        problems: list[PersonaError] = []
        for path, signature in current.items():
            if self._seen.get(path) == signature:
                continue
            self._seen[path] = signature
            changed = True
            try:
                persona = self._load(path, initial=initial)
            except PersonaError as exc:
                problems.append(exc)
                continue
            self._good[path] = persona
        if changed or initial:
            problems.extend(self._rebuild(initial=initial))
        return problems

    def _load(self, path: Path, *, initial: bool) -> Persona:
        try:
            persona = load_persona_file(path)
        except PersonaError as exc:
            kept = self._good.get(path)
            if not initial:
                why = f"still serving the last good version of {kept.name!r}" if kept else "skipped"
                logger.warning("rejected persona file %s (%s):\n%s", path, why, exc)
            raise
        if not initial:
            logger.info("loaded persona %r from %s", persona.name, path)
        return persona

    def _rebuild(self, *, initial: bool) -> list[PersonaError]:
        owner: dict[str, Path] = {}
        problems: list[PersonaError] = []
        for path, persona in sorted(self._good.items()):
            if persona.name in owner:
                message = f"duplicate persona name {persona.name!r} (also in {owner[persona.name]})"
                problems.append(_fail(path, None, "name", message))
                if not initial:
                    logger.warning("%s", problems[-1])
            else:
                owner[persona.name] = path
        self._by_name = {name: self._good[path] for name, path in owner.items()}
        return problems


def check_directory(directory: Path) -> tuple[list[Persona], list[PersonaError]]:
    """Load every persona file of `directory` for `personas check`: (good personas, problems)."""
    registry = PersonaRegistry(directory)
    problems = registry.load_all()
    return registry.all(), problems
