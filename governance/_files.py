"""Load YAML files into pydantic models with errors that name file, field and line.

A validation error from pydantic is turned into one :class:`ConfigError` whose
message reads like ``policies/customers.yaml:14: columns.email.class: must be
one of direct_identifier, quasi_identifier, sensitive, public, subject_key (got
'secret')``. When a file has several problems, all of them are listed, each on
its own line, the first one in the headline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from governance.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class FieldError(ValueError):
    """A validator's error about one place inside the model: ``loc`` is relative to the model."""

    def __init__(self, loc: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def read_yaml(path: Path, *, error: type[ConfigError] = ConfigError) -> tuple[Any, yaml.Node | None]:
    """Parse ``path`` and return ``(data, node_tree)``; YAML syntax errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error("file not found", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text (byte {exc.start})", path=str(path)) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror}", path=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise error(f"invalid YAML: {exc.problem}", path=str(path), line=line) from None
    except yaml.YAMLError as exc:
        raise error(f"invalid YAML: {exc}", path=str(path)) from None
    return data, node


def locate(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Return the 1-based line of the deepest node of ``loc`` that exists in the tree."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == str(part):
                    node = value
                    line = key.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(err: dict[str, Any]) -> str:
    msg = err["msg"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return str(cause)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        return "unknown field (check the spelling; see docs/configuration.md)"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] in {"literal_error", "enum"}:
        return f"{msg[0].lower()}{msg[1:]} (got {err.get('input')!r})"
    inp = err.get("input")
    if isinstance(inp, (str, int, float, bool)) and err["type"] != "value_error":
        return f"{msg[0].lower()}{msg[1:]} (got {inp!r})"
    return msg


def _loc(err: dict[str, Any]) -> tuple[Any, ...]:
    """The error's location in the file: pydantic's, minus wrapper names, plus a FieldError's own."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and "]" in p))
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc += cause.loc
    return loc


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validate_file(
    model: type[M],
    path: Path,
    *,
    error: type[ConfigError] = ConfigError,
    context: dict[str, Any] | None = None,
) -> M:
    """Read ``path`` and validate it as ``model``; raise ``error`` naming file, field and line."""
    data, node = read_yaml(path, error=error)
    if data is None:
        raise error("file is empty", path=str(path))
    if not isinstance(data, dict):
        raise error(f"top level must be a mapping, not {type(data).__name__}", path=str(path), line=1)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = _loc(first)
        msg = _describe(first)
        extra = ""
        if len(errors) > 1:
            rest = []
            for e in errors[1:]:
                eloc = _loc(e)
                rest.append(f"  line {locate(node, eloc)}: {_field(eloc) or '<top>'}: {_describe(e)}")
            extra = f"\n{len(errors) - 1} more problem(s):\n" + "\n".join(rest)
        raise error(msg + extra, path=str(path), field=_field(loc) or None, line=locate(node, loc)) from None
