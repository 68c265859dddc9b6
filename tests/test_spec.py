"""The spec language: loading, validation messages, round trips, keys."""

import subprocess
import sys
import textwrap

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from dilated_compiler import AttentionSpec, Branch, SpecError, load_spec

BASE = {"branches": [{"segment_length": 2048, "dilation": 1}, {"segment_length": 4096, "dilation": 2}]}


def test_load_from_dict_yaml_text_path_and_spec(tmp_path):
    spec = load_spec(BASE)
    assert spec.branches == (Branch(2048, 1), Branch(4096, 2))
    assert spec.head_assignment == "grouped" and spec.causal is False and spec.scale is None and spec.name is None
    assert load_spec(spec) is spec
    text = "name: two\nbranches:\n  - {segment_length: 2048, dilation: 1}\n  - {segment_length: 4096, dilation: 2}\n"
    from_text = load_spec(text)
    assert from_text.name == "two" and from_text.branches == spec.branches
    path = tmp_path / "two.yaml"
    path.write_text(text)
    assert load_spec(str(path)) == from_text
    assert load_spec(path) == from_text


def test_spec_is_frozen_and_hashable():
    spec = load_spec(BASE)
    with pytest.raises(Exception):
        spec.causal = True  # type: ignore[misc]
    assert hash(spec) == hash(load_spec(BASE))


def test_python_construction_and_defaults():
    spec = AttentionSpec([Branch(8, 2, offset=1)], causal=True, scale=2)
    assert isinstance(spec.branches, tuple) and spec.scale == 2.0 and isinstance(spec.scale, float)
    assert Branch(4).dilation == 1 and Branch(4).offset is None
    assert spec.softmax_scale(64) == 2.0
    assert AttentionSpec([Branch(8)]).softmax_scale(64) == 0.125


def test_to_yaml_round_trip():
    spec = AttentionSpec((Branch(16, 4, offset=3), Branch(32, 8)), causal=True, scale=0.5, name="x")
    again = load_spec(spec.to_yaml())
    assert again == spec and again.key == spec.key


def test_key_is_stable_across_processes():
    spec = load_spec(BASE)
    code = textwrap.dedent(f"""
        from dilated_compiler import load_spec
        print(load_spec({BASE!r}).key)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == spec.key


def test_key_distinguishes_semantics_not_name():
    a = load_spec(BASE)
    assert load_spec({**BASE, "name": "other"}).key == a.key
    assert load_spec({**BASE, "causal": True}).key != a.key
    assert load_spec({**BASE, "head_assignment": "all"}).key != a.key
    assert load_spec({**BASE, "scale": 0.1}).key != a.key
    assert load_spec({"branches": [{"segment_length": 2048}, {"segment_length": 4096, "dilation": 4}]}).key != a.key
    # grouped mode: branch i's default offset is i % dilation, so writing it out is the same pattern
    default = AttentionSpec((Branch(2048, 1), Branch(4096, 2), Branch(8192, 4)))
    assert AttentionSpec((Branch(2048, 1), Branch(4096, 2, 1), Branch(8192, 4, 2))).key == default.key
    assert AttentionSpec((Branch(2048, 1), Branch(4096, 2, 0), Branch(8192, 4, 2))).key != default.key
    assert AttentionSpec(default.branches, head_assignment="all").key != default.key


@pytest.mark.parametrize(
    "data, fragments",
    [
        ({"branches": [{"segment_length": 0}]}, ["branches[0].segment_length", "0", "1 <= segment_length <= 2**40"]),
        ({"branches": [{"segment_length": 2 ** 63}]}, ["branches[0].segment_length", "<= 2**40"]),
        ({"branches": [{"segment_length": 8, "dilation": 9}]}, ["branches[0].dilation", "9", "<= segment_length (8)"]),
        ({"branches": [{"segment_length": 8, "dilation": 2, "offset": 2}]}, ["branches[0].offset", "0 <= offset < dilation (2)"]),
        ({"branches": [{"segment_length": "8"}]}, ["branches[0].segment_length", "'8' (str)"]),
        ({"branches": [{"segment_length": 8.5}]}, ["branches[0].segment_length", "8.5 (float)"]),
        ({"branches": [{"segment_length": 8.0}]}, ["branches[0].segment_length", "8.0 (float)"]),
        ({"branches": [{"segment_length": True}]}, ["branches[0].segment_length", "True (bool)"]),
        ({"branches": []}, ["branches", "non-empty list"]),
        ({"branches": "x"}, ["branches", "non-empty list"]),
        ({"branches": [5]}, ["branches[0]", "mapping"]),
        ({"branches": [{"dilation": 2}]}, ["branches[0].segment_length", "missing"]),
        ({}, ["branches: missing"]),
        ({**BASE, "head_assignment": "mixed"}, ["head_assignment", "'mixed'", "grouped", "all"]),
        ({**BASE, "causal": "yes please"}, ["causal", "true or false"]),
        ({**BASE, "causal": 1}, ["causal", "1 (int)"]),
        ({**BASE, "scale": -1.0}, ["scale", "> 0"]),
        ({**BASE, "scale": float("nan")}, ["scale", "finite"]),
        ({**BASE, "scale": 10 ** 400}, ["scale", "finite"]),
        ({**BASE, "scale": "0.1"}, ["scale", "'0.1' (str)"]),
        ({**BASE, "name": 3}, ["name", "3 (int)"]),
        ({**BASE, "segment_lenght": 3}, ["segment_lenght", "unknown key"]),
        ({**BASE, "casual": True}, ["casual", "did you mean 'causal'"]),
        ({"branches": [{"segment_length": 8, "dilaton": 2}]}, ["branches[0].dilaton", "did you mean 'dilation'"]),
        ({**BASE, "sparsity": {}}, ["sparsity", "not supported"]),
        ({**BASE, "topology": {}}, ["topology", "not supported"]),
        ({"branches": [{"segment_length": 8, "dilation": 2, "offset": 1}], "head_assignment": "all"},
         ["branches[0].offset", "only with head_assignment 'grouped'"]),
    ],
)
def test_invalid_specs_name_field_value_and_allowed(data, fragments):
    with pytest.raises(SpecError) as info:
        load_spec(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_all_problems_reported_at_once():
    data = {"branches": [{"segment_length": 0, "dilation": 0}, {"segment_length": 4, "dilation": 8}],
            "causal": "no", "colour": 1}
    with pytest.raises(SpecError) as info:
        load_spec(data)
    paths = ["branches[0].segment_length", "branches[0].dilation", "branches[1].dilation", "causal", "colour"]
    assert len(info.value.problems) == len(paths)
    for p in paths:
        assert p in str(info.value)


def test_spec_error_is_value_error():
    assert issubclass(SpecError, ValueError)


def test_python_constructors_validate_too():
    with pytest.raises(SpecError, match="dilation"):
        Branch(4, 8)
    with pytest.raises(SpecError, match="segment_length"):
        Branch("4")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="branches"):
        AttentionSpec(())
    with pytest.raises(SpecError, match=r"branches\[0\]"):
        AttentionSpec(({"segment_length": 4},))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="head_assignment"):
        AttentionSpec((Branch(4),), head_assignment="each")
    with pytest.raises(SpecError, match="offset"):
        AttentionSpec((Branch(4, 2, offset=1),), head_assignment="all")


def test_yaml_syntax_error_reports_line_and_column():
    text = "branches:\n  - {segment_length: 8, dilation: 2\n  - {segment_length: 16}\n"
    with pytest.raises(SpecError) as info:
        load_spec(text)
    assert "line 3" in str(info.value) and "column" in str(info.value)


def test_duplicate_yaml_keys_are_errors():
    with pytest.raises(SpecError, match="duplicate key 'causal'"):
        load_spec("branches: [{segment_length: 8}]\ncausal: true\ncausal: false\n")
    # a key of the mapping's own overriding one merged in from an anchor is no duplicate
    spec = load_spec("branches:\n  - &b {segment_length: 8, dilation: 1}\n  - {<<: *b, dilation: 2}\n")
    assert spec.branches == (Branch(8, 1), Branch(8, 2))
    with pytest.raises(SpecError, match="duplicate key 'dilation'"):
        load_spec("branches:\n  - &b {segment_length: 8}\n  - {<<: *b, dilation: 2, dilation: 4}\n")


@pytest.mark.parametrize("text", ["name: 2024-02-30\nbranches: [{segment_length: 8}]\n",
                                  "branches: [{segment_length: 0x_}]\n"])
def test_values_yaml_refuses_are_spec_errors(text):
    with pytest.raises(SpecError, match="YAML value error"):
        load_spec(text)


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "null"])
def test_empty_documents(text):
    with pytest.raises(SpecError, match="empty"):
        load_spec(text)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string", "42"])
def test_non_mapping_documents(text):
    with pytest.raises(SpecError, match="mapping"):
        load_spec(text)


def test_missing_file_and_bad_source_type(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(SpecError, match="cannot load a spec"):
        load_spec(42)  # type: ignore[arg-type]
    # a string without a .yaml/.yml ending is YAML text: the error says so
    with pytest.raises(SpecError, match=r"the document is 'spec.json' \(str\).*unless it ends in .yaml or .yml"):
        load_spec("spec.json")


# ---- property tests ------------------------------------------------------------------------------------------

valid_branch = st.integers(1, 64).flatmap(
    lambda w: st.integers(1, w).flatmap(
        lambda r: st.builds(lambda off: Branch(w, r, off), st.one_of(st.none(), st.integers(0, r - 1)))))


@st.composite
def valid_specs(draw):
    mode = draw(st.sampled_from(["grouped", "all"]))
    branches = draw(st.lists(valid_branch, min_size=1, max_size=4))
    if mode == "all":
        branches = [Branch(b.segment_length, b.dilation) for b in branches]
    scale = draw(st.one_of(st.none(), st.floats(1e-3, 10)))
    name = draw(st.one_of(st.none(), st.text(max_size=10)))
    return AttentionSpec(tuple(branches), head_assignment=mode, causal=draw(st.booleans()), scale=scale, name=name)


@given(valid_specs())
@settings(max_examples=100, deadline=None)
def test_round_trip_property(spec):
    assert load_spec(spec.to_yaml()) == spec
    assert load_spec(spec.to_dict()) == spec
    assert load_spec(spec.to_yaml()).key == spec.key


junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(allow_nan=True), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=8,
)


@st.composite
def mutated_specs(draw):
    data = draw(valid_specs()).to_dict()
    where = draw(st.sampled_from(["top", "branch", "extra"]))
    if where == "top":
        data[draw(st.sampled_from(["branches", "head_assignment", "causal", "scale", "name"]))] = draw(junk)
    elif where == "branch":
        b = data["branches"][0]
        b[draw(st.sampled_from(["segment_length", "dilation", "offset"]))] = draw(junk)
    else:
        data[draw(st.text(min_size=1, max_size=8))] = draw(junk)
    return data


@given(mutated_specs())
@settings(max_examples=300, deadline=None)
def test_mutated_specs_raise_spec_error_or_load(data):
    try:
        spec = load_spec(data)
    except SpecError as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)
    else:  # some mutations are still valid; then they must round-trip
        assert load_spec(spec.to_yaml()) == spec


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_random_text_raises_only_spec_error(text):
    try:
        load_spec(text if not text.strip().lower().endswith((".yaml", ".yml")) else text + "\n")
    except SpecError:
        pass


@given(junk)
@settings(max_examples=200, deadline=None)
def test_random_yaml_documents_raise_only_spec_error(value):
    text = yaml.safe_dump(value)
    try:
        load_spec(text)
    except SpecError:
        pass


def test_bounds_are_exact():
    """The documented bounds, at their edges: segment lengths up to 2**40, a scale above 0."""
    assert load_spec({"branches": [{"segment_length": 2 ** 40, "dilation": 2 ** 40}]}).branches[0].dilation == 2 ** 40
    with pytest.raises(SpecError, match="segment_length"):
        load_spec({"branches": [{"segment_length": 2 ** 40 + 1}]})
    with pytest.raises(SpecError, match="scale"):
        load_spec({"branches": [{"segment_length": 8}], "scale": 0})
    assert load_spec({"branches": [{"segment_length": 8}], "scale": 1e-300}).scale == 1e-300
