"""The spec language: what attention pattern a user declares.

A spec is a frozen :class:`AttentionSpec` holding one or more :class:`Branch` es (segment length ``w``,
dilation ``r``, optional offset). It is written in YAML or built in Python; both go through the same
validation, which reports *every* problem at once, each naming its field path, the bad value and what is
allowed.

The exact meaning of a spec (which query attends to which key) is defined in :mod:`dilated_compiler.reference`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["AttentionSpec", "Branch", "SpecError", "load_spec", "HEAD_ASSIGNMENTS"]

HEAD_ASSIGNMENTS = ("grouped", "all")
# The longest segment a spec may declare: positions and their products with dilations and head counts stay far
# inside int64 (a segment longer than the sequence is one segment covering all of it).
MAX_SEGMENT_LENGTH = 2 ** 40

_SPEC_KEYS = ("name", "branches", "head_assignment", "causal", "scale")
_BRANCH_KEYS = ("segment_length", "dilation", "offset")
# Sections reserved for later capabilities: recognised, so that a spec using them gets a clear message
# instead of a did-you-mean to an unrelated key.
_RESERVED_KEYS = {
    "sparsity": "block sparsity is not supported by this version of dilated-compiler",
    "topology": "ring topology is not supported by this version of dilated-compiler",
}


class SpecError(ValueError):
    """An invalid attention spec. ``problems`` lists every problem found, each naming its field path."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"invalid attention spec{f' ({source})' if source else ''}"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            msg = head + f": {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


# --------------------------------------------------------------------------------------------------------------
# Validation helpers: each returns a list of problems, never raises.


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _branch_problems(w: Any, r: Any, offset: Any, path: str, head_assignment: Any = "grouped") -> list[str]:
    problems = []
    w_ok = _is_int(w) and 1 <= w <= MAX_SEGMENT_LENGTH
    if not w_ok:
        problems.append(f"{path}.segment_length: got {_describe(w)}; allowed: an integer with 1 <= segment_length "
                        f"<= 2**40")
    r_ok = _is_int(r) and r >= 1 and (not w_ok or r <= w)
    if not r_ok:
        bound = f"segment_length ({w})" if w_ok else "segment_length"
        problems.append(f"{path}.dilation: got {_describe(r)}; allowed: an integer with 1 <= dilation <= {bound}")
    if offset is not None:
        if head_assignment == "all":
            problems.append(
                f"{path}.offset: got {_describe(offset)}; allowed only with head_assignment 'grouped' "
                "(in 'all' mode head h uses offset h % dilation); remove it"
            )
        elif not (_is_int(offset) and offset >= 0 and (not r_ok or offset < r)):
            bound = f"dilation ({r})" if r_ok else "dilation"
            problems.append(f"{path}.offset: got {_describe(offset)}; allowed: an integer with 0 <= offset < {bound}")
    return problems


def _spec_problems(branches: Any, head_assignment: Any, causal: Any, scale: Any, name: Any) -> list[str]:
    problems = []
    if name is not None and not isinstance(name, str):
        problems.append(f"name: got {_describe(name)}; allowed: a string or null")
    if head_assignment not in HEAD_ASSIGNMENTS or not isinstance(head_assignment, str):
        problems.append(f"head_assignment: got {_describe(head_assignment)}; allowed: one of {list(HEAD_ASSIGNMENTS)}")
    if not isinstance(causal, bool):
        problems.append(f"causal: got {_describe(causal)}; allowed: true or false")
    if scale is not None:
        is_num = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not (is_num and _finite(scale) and scale > 0):
            problems.append(f"scale: got {_describe(scale)}; allowed: a finite number > 0, or null for 1/sqrt(head_dim)")
    if not isinstance(branches, (list, tuple)) or len(branches) == 0:
        problems.append(f"branches: got {_describe(branches)}; allowed: a non-empty list of branches")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The spec objects.


@dataclasses.dataclass(frozen=True)
class Branch:
    """One (segment length, dilation) pair. ``offset`` (grouped mode only) overrides the default offset."""

    segment_length: int
    dilation: int = 1
    offset: int | None = None

    def __post_init__(self):
        problems = _branch_problems(self.segment_length, self.dilation, self.offset, "Branch")
        if problems:
            raise SpecError(problems)

    def to_dict(self) -> dict:
        d = {"segment_length": self.segment_length, "dilation": self.dilation}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A declared attention pattern. Build it directly or with :func:`load_spec`."""

    branches: tuple[Branch, ...]
    head_assignment: str = "grouped"
    causal: bool = False
    scale: float | None = None
    name: str | None = None

    def __post_init__(self):
        problems = _spec_problems(self.branches, self.head_assignment, self.causal, self.scale, self.name)
        if isinstance(self.branches, (list, tuple)):
            object.__setattr__(self, "branches", tuple(self.branches))
            for i, b in enumerate(self.branches):
                if not isinstance(b, Branch):
                    problems.append(f"branches[{i}]: got {_describe(b)}; allowed: a Branch")
                elif b.offset is not None and self.head_assignment == "all":
                    problems += _branch_problems(b.segment_length, b.dilation, b.offset, f"branches[{i}]", "all")
        if problems:
            raise SpecError(problems)
        if self.scale is not None:
            object.__setattr__(self, "scale", float(self.scale))

    # ---- views -------------------------------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def softmax_scale(self, head_dim: int) -> float:
        """The factor applied to q k^T: ``scale``, or 1/sqrt(head_dim) where it is null."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.name is not None:
            d["name"] = self.name
        d["branches"] = [b.to_dict() for b in self.branches]
        d["head_assignment"] = self.head_assignment
        d["causal"] = self.causal
        d["scale"] = self.scale
        return d

    def to_yaml(self) -> str:
        """YAML text that :func:`load_spec` turns back into an equal spec."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @property
    def key(self) -> str:
        """A stable content hash of the semantics (the ``name`` is not part of it): equal patterns share
        compiled plans, in this process and across processes."""
        semantic = self.to_dict()
        semantic.pop("name", None)
        if self.head_assignment == "grouped":  # a default offset and the same offset written out are one pattern
            for i, (b, d) in enumerate(zip(self.branches, semantic["branches"])):
                d["offset"] = b.offset if b.offset is not None else i % b.dilation
        text = json.dumps(semantic, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        parts = ", ".join(
            f"(w={b.segment_length}, r={b.dilation}{'' if b.offset is None else f', offset={b.offset}'})"
            for b in self.branches
        )
        extra = " causal" if self.causal else ""
        return f"AttentionSpec[{self.name or self.key}: {self.head_assignment}{extra}; {parts}]"


# --------------------------------------------------------------------------------------------------------------
# Loading.


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys (plain YAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    own = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
    loader.flatten_mapping(node)  # merged keys ("<<: *anchor") come first, and keys of the node's own override them
    seen = {}
    for key_node in own:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise SpecError(f"YAML syntax error at {where}: {what}", source) from None
    except yaml.YAMLError as e:  # pragma: no cover - non-marked YAML errors are rare
        raise SpecError(f"YAML error: {e}", source) from None
    except (ValueError, OverflowError) as e:  # a value YAML's own types refuse, e.g. the date 2024-02-30
        raise SpecError(f"YAML value error: {e}", source) from None


def _unknown_key_problems(mapping: Mapping, allowed: tuple[str, ...], path: str) -> list[str]:
    problems = []
    for key in mapping:
        if key in allowed:
            continue
        where = f"{path}.{key}" if path else str(key)
        if path == "" and key in _RESERVED_KEYS:
            problems.append(f"{where}: {_RESERVED_KEYS[key]}")
            continue
        if not isinstance(key, str):
            problems.append(f"{path or 'spec'}: key {_describe(key)} is not a string; allowed keys: {list(allowed)}")
            continue
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"{where}: unknown key{hint} (allowed keys: {', '.join(allowed)})")
    return problems


def _from_mapping(data: Any, source: str | None) -> AttentionSpec:
    if data is None:
        raise SpecError("the document is empty; a spec is a mapping with at least 'branches'", source)
    if not isinstance(data, Mapping):
        hint = ("; a string is read as YAML text unless it ends in .yaml or .yml, which makes it a file's path"
                if isinstance(data, str) and source is None else "")
        raise SpecError(f"the document is {_describe(data)}; a spec is a mapping with at least 'branches'{hint}",
                        source)
    problems = _unknown_key_problems(data, _SPEC_KEYS, "")
    if "branches" not in data:
        problems.append("branches: missing; a spec needs a non-empty list of branches, e.g. "
                        "[{segment_length: 2048, dilation: 1}]")
    branches_raw = data.get("branches", [None])
    head_assignment = data.get("head_assignment", "grouped")
    causal = data.get("causal", False)
    scale = data.get("scale", None)
    name = data.get("name", None)
    if "branches" in data:
        problems += _spec_problems(branches_raw, head_assignment, causal, scale, name)
    else:
        problems += _spec_problems([None], head_assignment, causal, scale, name)
    branches = []
    if isinstance(branches_raw, (list, tuple)) and "branches" in data:
        for i, b in enumerate(branches_raw):
            path = f"branches[{i}]"
            if not isinstance(b, Mapping):
                problems.append(f"{path}: got {_describe(b)}; allowed: a mapping with segment_length "
                                "(and optional dilation, offset)")
                continue
            problems += _unknown_key_problems(b, _BRANCH_KEYS, path)
            if "segment_length" not in b:
                problems.append(f"{path}.segment_length: missing; allowed: an integer >= 1")
                continue
            w, r, off = b.get("segment_length"), b.get("dilation", 1), b.get("offset")
            branch_problems = _branch_problems(w, r, off, path, head_assignment)
            problems += branch_problems
            if not branch_problems:
                branches.append(Branch(w, r, off))
    if problems:
        raise SpecError(problems, source)
    return AttentionSpec(tuple(branches), head_assignment=head_assignment, causal=causal, scale=scale, name=name)


def load_spec(source: "str | os.PathLike | Mapping | AttentionSpec") -> AttentionSpec:
    """Load a spec from a .yaml/.yml path, a YAML string, a mapping, or return an ``AttentionSpec`` as is.

    Every invalid spec raises :class:`SpecError` naming each bad field, its value and what is allowed.
    """
    if isinstance(source, AttentionSpec):
        return source
    if isinstance(source, Mapping):
        return _from_mapping(source, None)
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and source.strip().lower().endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"spec file {str(path)!r} does not exist or is not a file", str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read spec file: {e}", str(path)) from None
        return _from_mapping(_parse_yaml(text, str(path)), str(path))
    if isinstance(source, str):
        return _from_mapping(_parse_yaml(source, None), None)
    raise SpecError(
        f"cannot load a spec from {_describe(source)}; allowed: a path to a .yaml/.yml file, a YAML string, "
        "a mapping, or an AttentionSpec"
    )
