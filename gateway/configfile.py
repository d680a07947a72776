"""Reading a YAML config file into a pydantic model, with the position of every problem.

    load_model(path, env, Model, secret_files=..., checks=...) -> Model
        or ConfigError(.issues: [ConfigIssue, ...])

Nothing here knows the gateway's sections: the caller gives the root model, says which
`NAME_file` keys are secret files, and supplies the rules that span sections. Loading runs
four steps, each collecting problems instead of stopping at the first one:

1. compose: PyYAML builds the node tree, so every key and value keeps its line and column;
2. read: nodes become plain data (`${NAME}` replaced from the environment, duplicate and
   non-string keys refused) while the position of every key and value is recorded by path,
   e.g. ("routes", 0, "timeout"); each secret file the caller names (`NAME_file: PATH`) is
   read into `NAME` (`keys`: one per line);
3. validate: pydantic checks every value, with the context `{"base_dir": <the file's
   directory>}`; each error's `loc` is mapped back to a recorded position (an unknown key
   points at the key, anything else at the value);
4. cross-check: the caller's rules spanning sections, each problem placed at the first of
   its candidate positions written in the file.

Only the config file and the secret files it names are read: no network, nothing written.
It is blocking file I/O, so a running server calls it in a thread (STYLE 16).
"""

from __future__ import annotations

import difflib
import gc
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.reader import ReaderError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)
SecretFiles = Callable[[dict[str, Any]], Iterable[tuple[dict[str, Any], Loc, str]]]


# -- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int  # 1-based
    col: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """The config file is not usable; `issues` holds every problem, sorted by position."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


@dataclass(frozen=True, slots=True)
class Problem:
    """A cross-field problem found in a valid model (step 4)."""

    message: str
    where: tuple[Loc, ...]  # candidates: the first one written in the file is used


def yaml_kind(value: object) -> str:
    """What a YAML value looks like to an operator, for 'expected X, got Y'."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a mapping" if isinstance(value, dict) else "a list"


def shown(value: object) -> str:
    """A value as quoted in a message: strings shortened, anything else by its kind."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return yaml_kind(value)


def dotted(path: Loc) -> str:
    """("routes", 0, "timeout") -> `routes[0].timeout`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _prefix(path: Loc) -> str:
    return f"{dotted(path)}: " if path else ""


# -- step 2: YAML nodes to data, with positions ------------------------------------------------

# libyaml's parser (PyYAML's C binding, in every PyYAML wheel) composes a 10,000-route file
# about 10x faster than the pure-Python one; both give the same nodes with the same marks.
_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_ENV_REF_NAMED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHIELD, _UNSHIELD = "\ue000\ue001", str.maketrans("\ue000\ue001", "{}")


def _shield_env_refs(text: str) -> str:
    """`${NAME}` -> `$\ue000NAME\ue001` before parsing, restored in every scalar after.

    YAML reads `{` inside a flow list as the start of a mapping, so the SPEC's own
    `keys: [${GATEWAY_STATE_KEY}]` would be a syntax error. The swap keeps every length,
    so line and column marks stay exact.
    """
    if any(char in text for char in _SHIELD):
        return text
    return _ENV_REF_NAMED.sub(lambda m: f"${_SHIELD[0]}{m[1]}{_SHIELD[1]}", text)


_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Reader:
    """Turns composed YAML nodes into plain data, recording where every key and value is."""

    def __init__(self, loader: SafeConstructor, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.marks: dict[Loc, tuple[Mark, Mark]] = {}  # path -> (key mark, value mark)
        self.problems: list[tuple[Mark, str]] = []
        self.poisoned: set[Loc] = set()  # values already reported: no second error on them
        self.mappings: set[Loc] = set()  # problems with a whole mapping point at its key
        self._checked: set[int] = set()
        self._open: set[int] = set()

    def fail(self, mark: Mark, message: str, path: Loc | None = None) -> None:
        self.problems.append((mark, message))
        if path is not None:
            self.poisoned.add(path)

    def read(self, node: yaml.Node, path: Loc, key_mark: Mark) -> Any:
        self.marks[path] = (key_mark, node.start_mark)
        if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
            self.fail(
                node.start_mark, f"{_prefix(path)}YAML tag {node.tag!r} is not supported", path
            )
            return None
        if id(node) in self._open:
            self.fail(node.start_mark, f"{_prefix(path)}an alias refers to itself", path)
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [
                    self.read(item, (*path, i), item.start_mark)
                    for i, item in enumerate(node.value)
                ]
            return self._scalar(node, path)
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Loc) -> dict[str, Any]:
        self.mappings.add(path)
        if id(node) not in self._checked:  # an alias reuses a node: check it once
            self._checked.add(id(node))
            self._refuse_duplicates(node, path)
        try:
            self.loader.flatten_mapping(node)  # '<<' merge keys
        except yaml.MarkedYAMLError as err:
            self.fail(err.problem_mark or node.start_mark, f"{_prefix(path)}{err.problem}", path)
            return {}
        data: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if self._is_name(key_node, path):
                key = key_node.value
                data[key] = self.read(value_node, (*path, key), key_node.start_mark)
        return data

    def _refuse_duplicates(self, node: yaml.MappingNode, path: Loc) -> None:
        # PyYAML keeps the last of two equal keys without a word; an operator means one of them.
        seen: dict[str, Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag != _STR_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            first = seen.setdefault(key_node.value, key_node.start_mark)
            if first is not key_node.start_mark:
                key = key_node.value.translate(_UNSHIELD)
                message = f"duplicate key {key!r} (first at line {first.line + 1})"
                self.fail(key_node.start_mark, f"{_prefix(path)}{message}")

    def _is_name(self, node: yaml.Node, path: Loc) -> bool:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG:
            node.value = node.value.translate(_UNSHIELD)
            return True
        if isinstance(node, yaml.ScalarNode):
            read_as = node.tag.rpartition(":")[2]
            message = f"key {node.value!r} is read by YAML as a {read_as}: quote it"
        else:
            message = "a key must be a name, not a list or mapping"
        self.fail(node.start_mark, f"{_prefix(path)}{message}")
        return False

    def _scalar(self, node: yaml.Node, path: Loc) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as err:
            self.fail(err.problem_mark or node.start_mark, f"{_prefix(path)}{err.problem}", path)
            return None
        if not isinstance(value, str):
            return value
        return self._interpolate(value.translate(_UNSHIELD), node.start_mark, path)

    def _interpolate(self, text: str, mark: Mark, path: Loc) -> str:
        """`${NAME}` -> the environment's NAME; `$${` -> a literal `${`."""
        if "${" not in text:
            return text
        errors: list[str] = []

        def replace(match: re.Match[str]) -> str:
            name = match[1]
            if match[0] == "$${":
                return "${"
            if name is None:
                errors.append("unclosed '${' (write $${ for a literal ${)")
            elif not _ENV_NAME.fullmatch(name):
                errors.append(f"bad environment variable name {name!r} in ${{...}}")
            elif name not in self.env:
                errors.append(f"environment variable {name} is not set")
            else:
                return self.env[name]
            return match[0]

        result = _ENV_REF.sub(replace, text)
        for error in errors:
            self.fail(mark, f"{_prefix(path)}{error}", path)
        return text if errors else result

    def inline_secret_file(
        self, section: dict[str, Any], path: Loc, name: str, base_dir: Path
    ) -> None:
        """Replace `NAME_file: PATH` by `NAME: <the file's content>` (`keys`: one per line)."""
        file_key = f"{name}_file"
        file_loc, value_loc = (*path, file_key), (*path, name)
        key_mark, value_mark = self.marks[file_loc]
        given = section.pop(file_key)
        if name in section:
            self.fail(
                key_mark, f"{_prefix(path)}give either {name} or {file_key}, not both", value_loc
            )
        elif not isinstance(given, str) or not given:
            self.fail(value_mark, f"{dotted(file_loc)}: expected a file path", value_loc)
        elif (text := self._read_text(base_dir / given, file_loc, value_loc)) is not None:
            lines = [s for s in (line.strip() for line in text.splitlines()) if s[:1] not in "#"]
            section[name] = lines if name == "keys" else text.strip()
            for loc in [value_loc, *((*value_loc, i) for i in range(len(lines)))]:
                self.marks[loc] = self.marks[file_loc]

    def _read_text(self, file: Path, file_loc: Loc, value_loc: Loc) -> str | None:
        mark = self.marks[file_loc][1]
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
            self.fail(mark, f"{dotted(file_loc)}: cannot read {file}: {reason}", value_loc)
            return None
        if not text.strip():
            self.fail(mark, f"{dotted(file_loc)}: {file} is empty", value_loc)
            return None
        return text


# -- step 3: pydantic errors to positions ------------------------------------------------------

_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "path_type": "a file path",
}


def _data_path(data: Any, loc: Loc) -> Loc:
    """The part of a pydantic `loc` that exists in the data (drops union members and such)."""
    path: list[str | int] = []
    for part in loc:
        in_dict = isinstance(data, dict) and isinstance(part, str) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if in_dict or in_list:
            data = data[part]
            path.append(part)
    return tuple(path)


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if field is not None:
            model = _find_model(field.annotation)
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (_find_model(arg) for arg in get_args(annotation))), None)


def _did_you_mean(root: type[BaseModel], loc: Loc) -> str:
    model = _model_at(root, loc[:-1])
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _explain(error: ErrorDetails) -> str:
    kind, ctx, value = error["type"], error.get("ctx", {}), error["input"]
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {shown(value)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {shown(value)}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "string_too_short":
        return "must not be empty"
    return error["msg"].replace("Input should", "should")


def _problem(root: type[BaseModel], error: ErrorDetails, data: Any) -> tuple[Loc, str, bool]:
    """(path in the data, message, whether to point at the key rather than the value)."""
    loc = error["loc"]
    path = _data_path(data, loc)
    if error["type"] == "extra_forbidden":
        return path, f"{_prefix(path[:-1])}unknown key {loc[-1]!r}{_did_you_mean(root, loc)}", True
    if error["type"] == "missing":
        return path, f"{_prefix(path)}missing required key {loc[-1]!r}", True
    return path, f"{_prefix(path)}{_explain(error)}", False


# -- load_model --------------------------------------------------------------------------------


def load_model(
    path: Path,
    env: Mapping[str, str],
    model: type[M],
    *,
    secret_files: SecretFiles,
    checks: Callable[[M], Iterable[Problem]],
) -> M:
    """Load, validate and cross-check a file; ConfigError lists every problem by position.

    `secret_files(data)` yields (section, its path, NAME) for each `NAME_file` to inline;
    `checks(model)` yields the problems that span sections.
    """
    with _gc_paused():
        return _Load(path, env, model, secret_files, checks).run()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a file loads: its nodes hold no cycles to collect.

    A 10,000-route file makes about a million objects; each collection they set off walks all
    of them again: 0.95 s to load with the collector running, 0.4 s without (bench/routes_load.py).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Load(Generic[M]):
    """One loading of one file: the four steps and the issues they find."""

    def __init__(
        self,
        path: Path,
        env: Mapping[str, str],
        model: type[M],
        secret_files: SecretFiles,
        checks: Callable[[M], Iterable[Problem]],
    ) -> None:
        self.file = str(path)
        self.source = path.absolute()
        self.base_dir = self.source.parent
        self.env = env
        self.model = model
        self.secret_files = secret_files
        self.checks = checks
        self.issues: list[ConfigIssue] = []

    def issue(self, mark: Mark | None, message: str) -> None:
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        self.issues.append(ConfigIssue(self.file, line, col, message))

    def run(self) -> M:
        loaded = None
        data, reader = self._compose_and_read()
        if reader is not None:
            for section, path, name in list(self.secret_files(data)):
                reader.inline_secret_file(section, path, name, self.base_dir)
            for mark, message in reader.problems:
                self.issue(mark, message)
            loaded = self._validate(data, reader)
        if self.issues:
            raise ConfigError(sorted(set(self.issues), key=lambda i: (i.line, i.col, i.message)))
        assert loaded is not None
        return loaded

    def _compose_and_read(self) -> tuple[dict[str, Any], _Reader | None]:
        text = self._text()
        if text is None:
            return {}, None
        loader = None
        shielded = _shield_env_refs(text)
        try:
            loader = _Loader(shielded)
            return self._read(loader, loader.get_single_node())
        except yaml.MarkedYAMLError as err:
            self._syntax_error(err)
        except ReaderError as err:
            position = err.position
            if _Loader is not yaml.SafeLoader:  # libyaml counts UTF-8 bytes, marks count characters
                position = len(shielded.encode()[:position].decode("utf-8", "ignore"))
            self.issue(_mark_at(text, position), f"invalid character in the file: {err.reason}")
        finally:
            if loader is not None:
                loader.dispose()
        return {}, None

    def _text(self) -> str | None:
        try:
            raw = self.source.read_bytes()
        except OSError as err:
            self.issue(None, f"cannot read the config file: {err.strerror or err}")
            return None
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            before = raw[: err.start].decode("utf-8", "replace")
            self.issue(_mark_at(before, len(before)), "not UTF-8 text")
            return None

    def _syntax_error(self, err: yaml.MarkedYAMLError) -> None:
        message = f"invalid YAML: {err.problem or err.context}"
        context, problem = err.context_mark, err.problem_mark
        if err.context and err.problem and context and problem and context.line != problem.line:
            message += f" ({err.context} at line {context.line + 1})"
        self.issue(err.problem_mark or err.context_mark, message)

    def _read(
        self, loader: SafeConstructor, node: yaml.Node | None
    ) -> tuple[dict[str, Any], _Reader | None]:
        if node is None:
            self.issue(None, "the config file is empty; it needs at least server: and routes:")
            return {}, None
        if not isinstance(node, yaml.MappingNode):
            self.issue(
                node.start_mark,
                "the config file must be a mapping of sections (server:, routes:, ...)",
            )
            return {}, None
        reader = _Reader(loader, self.env)
        return reader.read(node, (), node.start_mark), reader

    def _validate(self, data: dict[str, Any], reader: _Reader) -> M | None:
        try:
            loaded = self.model.model_validate(data, context={"base_dir": self.base_dir})
        except ValidationError as err:
            for path, message, at_key in (_problem(self.model, e, data) for e in err.errors()):
                self._report(reader, path, message, at_key)
            return None
        for problem in self.checks(loaded):
            path = next((w for w in problem.where if w in reader.marks), problem.where[0])
            self._report(reader, path, problem.message, at_key=False)
        return loaded

    def _report(self, reader: _Reader, path: Loc, message: str, at_key: bool) -> None:
        if any(path[: len(bad)] == bad for bad in reader.poisoned):
            return  # already reported (an unset variable, an unreadable secret file, ...)
        for depth in range(len(path), -1, -1):
            if (marks := reader.marks.get(path[:depth])) is not None:
                at_key = at_key or depth < len(path) or path in reader.mappings
                self.issue(marks[0] if at_key else marks[1], message)
                return
        self.issue(None, message)


def _mark_at(text: str, position: int) -> Mark:
    before = text[:position]
    line = before.count("\n")
    return Mark("", position, line, position - (before.rfind("\n") + 1), None, 0)
