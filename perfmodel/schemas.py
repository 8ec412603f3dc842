"""Validation of everything a user hands perfmodel, with pydantic v2, and one error line per problem.

Every boundary (hardware YAML, model YAML / config.json, measurement files, traces, length distributions, CLI
numbers) validates through the number types and the error formatter here, so a bad value always reads

    <where>: <dotted.field.path>: <what is allowed>, got <value>

and is raised as PerfmodelError (the CLI prints it and exits 2). Numbers are finite and in range; integers are
bounded so that no count overflows int64 and no array is sized from an absurd value.

Building blocks:
- ``number(gt=, ge=, lt=, le=)``: a finite float in a range; ``count(lo, hi)``: an integer in [lo, hi]
  (bools are refused, 2.0 is accepted as 2, 2.5 is not). Both accept numeric strings (PyYAML reads 6.74e9 as
  a string).
- ``Strict``: the base model for file schemas (unknown fields are refused, numbers coerce to str for names).
- ``validate(schema, data, where)``: validate or raise the one-line PerfmodelError.
- ``dataclass_schema(cls, rules)``: a pydantic model derived from a dataclass's fields, each field typed from
  its annotation (int -> count(0, 2**31), float -> finite >= 0, str, bool, dict, X | None) unless ``rules``
  names a tighter type. The model and efficiency schemas are built this way, so a new ModelSpec or Efficiency
  field is validated with no change here, and needs one line in its rules table only when the default range is
  wrong for it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator, create_model
from pydantic_core import PydanticCustomError

from perfmodel.errors import PerfmodelError, short, show

INT_MAX = 2**31  # the bound of a plain count (layers, heads, experts, seeds...)
TOKENS_MAX = 2**24  # tokens per sequence, and sequences per batch: 16.7 M
FLOAT_MAX = 1e15  # the sanity cap of a plain non-negative figure

_ERR = "perfmodel_range"


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _describe(kind: str, gt, ge, lt, le, cap: bool) -> str:
    parts = []
    if gt is not None:
        parts.append(f"> {_fmt(gt)}")
    if ge is not None:
        parts.append(f">= {_fmt(ge)}")
    hi = [f"< {_fmt(lt)}"] if lt is not None else [f"<= {_fmt(le)}"] if le is not None and not cap else []
    text = f"must be {kind}"
    if parts and hi and (gt is not None or ge is not None):
        lo_b = "(" if gt is not None else "["
        hi_b = ")" if lt is not None else "]"
        lo_v = gt if gt is not None else ge
        hi_v = lt if lt is not None else le
        return f"{text} in {lo_b}{_fmt(lo_v)}, {_fmt(hi_v)}{hi_b}"
    return " ".join([text, *parts, *hi])


def _range_type(base: type, kind: str, gt=None, ge=None, lt=None, le=None, cap: bool = False):
    """An Annotated base type whose every failure (unparseable, bool, NaN, inf, out of range) raises one custom
    error stating the whole allowed range. cap marks le as a sanity bound, named only when it is exceeded."""
    allowed = _describe(kind, gt, ge, lt, le, cap)
    above = f"must be {kind} <= {_fmt(le)}" if cap and le is not None else allowed

    def check(v: Any, handler):
        if isinstance(v, bool):
            raise PydanticCustomError(_ERR, allowed)
        try:
            x = handler(v)
        except (ValidationError, ValueError, TypeError, OverflowError):
            raise PydanticCustomError(_ERR, allowed) from None
        if isinstance(x, float) and not math.isfinite(x):
            raise PydanticCustomError(_ERR, allowed)
        if (gt is not None and not x > gt) or (ge is not None and not x >= ge):
            raise PydanticCustomError(_ERR, allowed)
        if (lt is not None and not x < lt) or (le is not None and not x <= le):
            raise PydanticCustomError(_ERR, above)
        return x

    return Annotated[base, WrapValidator(check), _Bounds(base, gt, ge, lt, le)]


@dataclasses.dataclass(frozen=True)
class _Bounds:
    """A range type's bounds, kept beside its validator so validate_column can check a long column natively."""

    base: type
    gt: float | None
    ge: float | None
    lt: float | None
    le: float | None

    def native(self):
        return Annotated[self.base, Field(gt=self.gt, ge=self.ge, lt=self.lt, le=self.le, allow_inf_nan=False)]


def number(gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None):
    """A finite float in the given range; with no upper bound, the sanity cap FLOAT_MAX applies."""
    cap = le is None and lt is None
    return _range_type(float, "a finite number", gt, ge, lt, FLOAT_MAX if cap else le, cap=cap)


def count(lo: int = 0, hi: int = INT_MAX):
    """An integer in [lo, hi]."""
    return _range_type(int, "an integer", ge=lo, le=hi)


Positive = number(gt=0)
NonNegative = number(ge=0)
Fraction = number(gt=0, le=1)  # an efficiency: (0, 1]
Tokens = count(1, TOKENS_MAX)


class Strict(BaseModel):
    """Base of the file schemas: unknown fields are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, arbitrary_types_allowed=True)


# --- deriving schemas from dataclasses --------------------------------------------------------------------


def _default_rule(tp: Any) -> Any:
    """The pydantic type for a dataclass annotation when the rules table does not name the field."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _default_rule(args[0]) if len(args) == 1 else tp
        return inner | None if type(None) in typing.get_args(tp) else inner
    if tp is bool:
        return bool
    if tp is int:
        return count(0, INT_MAX)
    if tp is float:
        return NonNegative
    if tp is str:
        return str
    if tp is dict or origin is dict:
        return dict
    if tp is tuple or origin is tuple:
        return tuple
    return tp


def dataclass_schema(cls: type, rules: dict[str, Any], *, name: str | None = None, all_optional: bool = False,
                     skip: tuple[str, ...] = (), extra_fields: dict[str, tuple] | None = None,
                     base: type[BaseModel] = Strict) -> type[BaseModel]:
    """A pydantic model with one field per dataclass field of cls: type from rules[name] or the annotation,
    default from the dataclass (required where the dataclass has none). all_optional makes every field
    default to None ("not given": the caller keeps its base value)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, tuple] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = rules.get(f.name, _default_rule(hints[f.name]))
        if all_optional:
            fields[f.name] = (tp | None, None)
        elif f.default is not dataclasses.MISSING:
            fields[f.name] = (tp, f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            fields[f.name] = (tp, Field(default_factory=f.default_factory))  # type: ignore[misc]
        else:
            fields[f.name] = (tp, ...)
    fields.update(extra_fields or {})
    return create_model(name or f"{cls.__name__}Schema", __base__=base, **fields)


# --- errors -----------------------------------------------------------------------------------------------

_TYPE_TEXT = {
    "missing": "required field missing",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of fields",
    "model_attributes_type": "must be a mapping of fields",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "literal_error": None,  # pydantic's own text names the allowed values
}


def _loc_text(loc: tuple, rows: bool) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"row {part + 1}" if rows and i == 0 else f"[{part}]"
        else:
            out += ("" if not out else ": " if rows and i == 1 else ".") + str(part)
    return out


def _allowed_fields(schema: Any, loc: tuple) -> list[str]:
    """The field names allowed at loc (for 'unknown field' errors), walking nested models, lists and dicts."""
    tp = schema
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            f = tp.model_fields.get(part) if isinstance(part, str) else None
            if f is None:
                return []
            tp = f.annotation
        elif typing.get_origin(tp) in (list, tuple, dict):
            args = typing.get_args(tp)
            tp = args[-1] if args else Any
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def schema_error(where: str, err: ValidationError, schema: Any = None, rows: bool = False,
                 rename: dict[str, str] | None = None) -> PerfmodelError:
    """The first error of a ValidationError as one line: '<where>: <path>: <allowed>, got <value>'.
    rows: the top level is a list of records (render index 0 as 'row 1'); rename maps a field to the name the
    user wrote (a config.json key)."""
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    if rename and loc and isinstance(loc[0], str) and loc[0] in rename:
        loc = (rename[loc[0]], *loc[1:])
    path = _loc_text(loc, rows)
    kind = e["type"]
    if kind == _ERR:
        msg = e["msg"]
    elif kind == "extra_forbidden":
        allowed = _allowed_fields(schema, tuple(e["loc"])[:-1]) if schema is not None else []
        msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return PerfmodelError(f"{where}: {path}: {msg}")
    elif kind == "missing":
        return PerfmodelError(f"{where}: {path}: required field missing")
    else:
        msg = _TYPE_TEXT.get(kind) or e["msg"][:1].lower() + e["msg"][1:]
    prefix = f"{where}: {path}: " if path else f"{where}: "
    return PerfmodelError(f"{prefix}{msg}, got {show(e.get('input'))}")


_ADAPTERS: dict[int, tuple[Any, TypeAdapter]] = {}


def validate(schema: Any, data: Any, where: str, rows: bool = False, rename: dict[str, str] | None = None):
    """Validate data against a pydantic model or type, or raise the one-line PerfmodelError."""
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        hit = _ADAPTERS.get(id(schema))
        if hit is None or hit[0] is not schema:  # the schema is kept in the entry, so its id stays its own
            hit = _ADAPTERS[id(schema)] = (schema, TypeAdapter(schema))
        return hit[1].validate_python(data)
    except ValidationError as err:
        raise schema_error(where, err, schema, rows=rows, rename=rename) from None


def validate_column(values: list, rule: Any, where: str, column: str, first_row: int = 1,
                    rows: list[int] | None = None) -> list:
    """A long column (a trace, a measurements file) against a range rule: checked natively by pydantic-core
    (about 0.1 s per million values), and the first bad value re-checked by the rule for its message,
    '<where>: row N: <column>: <allowed>, got <value>'. rows: the row index of each value, when values is a
    selection of a column."""
    bounds = next((m for m in typing.get_args(rule)[1:] if isinstance(m, _Bounds)), None)
    if bounds is None:
        raise TypeError("validate_column needs a number() or count() rule")
    native = TypeAdapter(list[bounds.native()])
    try:
        return native.validate_python(values)
    except ValidationError as err:
        i = err.errors(include_url=False)[0]["loc"][0]
    row = (rows[i] if rows is not None else i) + first_row
    validate(rule, values[i], f"{where}: row {row}: {column}")
    raise PerfmodelError(f"{where}: row {row}: {column}: not a valid value, got {show(values[i])}")


def check_value(field: str, value: Any, rule: Any) -> Any:
    """One value against one rule (a CLI option, a distribution parameter): '<field>: <allowed>, got <value>'."""
    return validate(rule, value, field)


# --- files ------------------------------------------------------------------------------------------------


def is_file(path: Any) -> bool:
    """Path.is_file that answers False, instead of raising, for names the OS refuses (too long, NUL bytes)."""
    from pathlib import Path

    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: Any) -> bool:
    from pathlib import Path

    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def read_text(path: Any, where: str | None = None) -> str:
    """A user's text file, or one clean error line (unreadable, a folder, not UTF-8 text)."""
    from pathlib import Path

    where = where or short(path)
    try:
        return Path(path).read_text()
    except UnicodeDecodeError:
        raise PerfmodelError(f"{where}: not a UTF-8 text file") from None
    except IsADirectoryError:
        raise PerfmodelError(f"{where}: is a folder, expected a file") from None
    except OSError as e:
        raise PerfmodelError(f"{where}: cannot be read ({e.strerror or e})") from None


def read_yaml_mapping(path: Any) -> dict:
    """A YAML file whose top level is a mapping, or one clean error line."""
    import yaml

    where = short(path)
    text = read_text(path, where)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise PerfmodelError(f"{where}: malformed YAML{line}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise PerfmodelError(f"{where}: malformed YAML: nested too deeply") from None
    if not isinstance(d, dict):
        raise PerfmodelError(f"{where}: expected a YAML mapping of fields, got {type(d).__name__}")
    return d


def read_csv_strings(path: Any, where: str):
    """A CSV as a DataFrame of strings exactly as written ('nan' or 'abc' in a number column stays text for the
    schema to refuse; an empty cell is ''), or one clean error line: an empty or binary file, or rows with
    more fields than the header."""
    import warnings

    import pandas as pd

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False)
    except pd.errors.EmptyDataError:
        raise PerfmodelError(f"{where}: empty file; expected a header line and one row per record") from None
    except pd.errors.ParserWarning:
        raise PerfmodelError(f"{where}: a row has more fields than the header") from None
    except UnicodeDecodeError:
        raise PerfmodelError(f"{where}: not a UTF-8 text file") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise PerfmodelError(f"{where}: not a readable CSV ({short(e, 120)})") from None
    except IsADirectoryError:
        raise PerfmodelError(f"{where}: is a folder, expected a file") from None
