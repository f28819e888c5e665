"""Loading `drflow.yaml`: every problem at once, each with its field path and YAML line."""

from __future__ import annotations

import difflib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from drflow.config.fields import DEFER_CROSS_CHECKS, Loc, format_path
from drflow.config.models import DrflowConfig, cross_check


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file: the field's `path` (empty for the file as a whole),
    what is wrong, and where the YAML holds it when known."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, source: str) -> str:
        where = source if self.line is None else f"{source}:{self.line}"
        if self.line is not None and self.column is not None:
            where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every issue found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.format(source) for p in problems))


@dataclass
class _Marks:
    """YAML positions (1-based line, column) of keys and values, by path."""

    keys: dict[Loc, int]
    values: dict[Loc, int]

    def line_of(self, loc: Loc) -> int | None:
        # A missing field has no position: point at the nearest enclosing one instead.
        for n in range(len(loc), -1, -1):
            sub = loc[:n]
            pos = self.keys.get(sub) or self.values.get(sub)
            if pos is not None:
                return pos
        return None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _collect_marks(node: yaml.Node, loc: Loc, marks: _Marks, problems: list[Problem],
                   stack: set[int]) -> None:
    if id(node) in stack:  # a recursive alias
        return
    marks.values.setdefault(loc, _line(node))
    stack.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key: str | int = key_node.value
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":int"):
                key = int(key_node.value)
            line = _line(key_node)
            if str(key) in first and key != "<<":
                problems.append(Problem(format_path((*loc, key)),
                                        f"duplicate key (first at line {first[str(key)]})", line))
            first.setdefault(str(key), line)
            marks.keys.setdefault((*loc, key), line)
            _collect_marks(value_node, (*loc, key), marks, problems, stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_marks(item, (*loc, i), marks, problems, stack)
    stack.discard(id(node))


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class found at `loc` when walking down from DrflowConfig, if any."""
    tp: Any = DrflowConfig
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict and isinstance(part, str):
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _message(err: Any, loc: Loc) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        if close:
            return f"unknown field; did you mean {close[0]!r}?"
        return "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}
    if kind in ops:
        limit = next(iter(ctx.values()), "?")
        return f"must be {ops[kind]} {limit}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {n} {'entry' if n == 1 else 'entries'}"
    msg = str(err["msg"])
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if msg.startswith("Input should be"):
        return "must be" + msg.removeprefix("Input should be")
    return msg


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    return tuple(p for p in loc if p != "[key]")


def parse_config(text: str, source: str = "<string>") -> DrflowConfig:
    """Validate YAML `text`; raise ConfigError with every problem, each with path and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            started = f" started at line {e.context_mark.line + 1}" if e.context_mark else ""
            what += f" ({e.context}{started})"
        raise ConfigError(source, [Problem("", f"YAML syntax error: {what}", line, col)]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [Problem("", f"YAML error: {e}")]) from None
    if root is None:
        raise ConfigError(source, [Problem("", "the file is empty; start from "
                                               "examples/drflow.yaml")])
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the top level must be a mapping of sections "
                                               "(sites, aws, slack, audit, gateway, groups)", 1)])
    marks = _Marks({}, {})
    problems: list[Problem] = []
    _collect_marks(root, (), marks, problems, set())

    def problem(loc: Loc, message: str) -> Problem:
        # Columns only for syntax errors: a field's line is enough to find it.
        return Problem(format_path(loc), message, marks.line_of(loc))

    try:
        cfg = DrflowConfig.model_validate(data, context={DEFER_CROSS_CHECKS: True})
    except ValidationError as e:
        for err in e.errors(include_input=False, include_url=False):
            loc = _clean_loc(err["loc"])
            problems.append(problem(loc, _message(err, loc)))
        raise ConfigError(source, _sorted(problems)) from None
    problems += [problem(loc, msg) for loc, msg in cross_check(cfg)]
    if problems:
        raise ConfigError(source, _sorted(problems))
    return cfg


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.path))


def load_config(path: str | Path) -> DrflowConfig:
    """Read and validate a drflow YAML file; raise ConfigError (also for a missing file)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [Problem("", "no such file; copy examples/drflow.yaml and "
                                               "adapt it")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [Problem("", f"cannot read the file: {e}")]) from None
    return parse_config(text, source)


def dump_config(cfg: DrflowConfig) -> str:
    """YAML text that `load_config` reads back to an equal config; secrets stay references."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
