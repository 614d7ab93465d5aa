"""Pipeline text: parse, format, resolve (names, options, precedence, errors)."""

import pytest

from onnxopt.errors import PipelineError
from onnxopt.pipeline.text import PassSpec, format_pipeline, parse, resolve


def test_parse_names_and_options():
    specs = parse(" lossless , quantize-static{calibration=percentile, percentile=99.99,ops=[Conv,MatMul]},x ")
    assert [s.name for s in specs] == ["lossless", "quantize-static", "x"]
    assert specs[1].options == {"calibration": "percentile", "percentile": "99.99", "ops": ["Conv", "MatMul"]}


def test_quoted_values_and_empty_lists():
    (spec,) = parse("p{a='x, y',b=\"q\\\"r\",c=[]}")
    assert spec.options == {"a": "x, y", "b": 'q"r', "c": []}


@pytest.mark.parametrize("text", [
    "a", "a,b", "a{k=v}", "a{k=[1,2,3]},b{x=true,y=1.5}", "a{s='has space'}", "a{s='it\\'s'}"])
def test_format_parse_round_trip_is_canonical(text):
    once = format_pipeline(parse(text))
    assert format_pipeline(parse(once)) == once
    assert parse(once) == parse(text)


@pytest.mark.parametrize("text, where", [
    ("", "empty"), ("a,", "expected a pass"), ("a{k}", "expected '='"), ("a{k=v", "expected '}'"),
    ("a{k=[v}", "expected ']'"), ("a b", "expected ','"), ("a{k=1,k=2}", "given twice"),
    ("a{s='open}", "unterminated")])
def test_syntax_errors_point_at_the_problem(text, where):
    with pytest.raises(PipelineError, match=where):
        parse(text)


def test_resolve_unknown_pass_names_nearest():
    with pytest.raises(PipelineError, match="did you mean 'eliminate-dead-code'"):
        resolve("eliminate-dead-cod")


def test_resolve_unknown_option_names_nearest():
    from onnxopt import Pass, option, register_pass
    from dataclasses import dataclass

    @register_pass("test-options-pass")
    class OptionsPass(Pass):
        """A pass with typed options, for these tests."""

        @dataclass
        class Options:
            ratio: float = option(0.5, "a ratio")
            steps: int = option(2, "a count")
            on: bool = option(False, "a switch")
            ops: list[str] = option(["Conv"], "op types")
            mode: str = option("a", "a choice", choices=["a", "b"])

    with pytest.raises(PipelineError, match="did you mean 'ratio'"):
        resolve("test-options-pass{rati=0.1}")
    with pytest.raises(PipelineError, match="takes a int|takes a float"):
        resolve("test-options-pass{ratio=abc}")
    with pytest.raises(PipelineError, match="one of a, b"):
        resolve("test-options-pass{mode=c}")
    (spec,) = resolve("test-options-pass{ratio=0.25,steps=3,on=yes,ops=[MatMul,Gemm],mode=a}")
    # typed values; options equal to the default are dropped from the canonical form
    assert spec.options == {"ratio": 0.25, "steps": 3, "on": True, "ops": ["MatMul", "Gemm"]}
    # precedence: default < target table < pipeline text
    (spec,) = resolve("test-options-pass", pass_defaults={"test-options-pass": {"steps": 5}})
    assert spec.options == {"steps": 5}
    (spec,) = resolve("test-options-pass{steps=7}", pass_defaults={"test-options-pass": {"steps": 5}})
    assert spec.options == {"steps": 7}


def test_named_pipelines_expand_and_cycles_fail():
    pipelines = {"a": "eliminate-dead-code,b", "b": "lift-constants"}
    assert [s.name for s in resolve("a", pipelines)] == ["eliminate-dead-code", "lift-constants"]
    with pytest.raises(PipelineError, match="cycle"):
        resolve("x", {"x": "y", "y": "x"})
    with pytest.raises(PipelineError, match="takes no options"):
        resolve("a{k=1}", pipelines)


def test_spec_str_is_its_text():
    assert str(PassSpec("p", {"a": [1, 2], "b": "x y"})) == "p{a=[1,2],b='x y'}"


# -- fixed-point groups ----------------------------------------------------------------------
def test_fixed_point_group_parses_formats_and_resolves():
    text = "lift-constants,fixed-point{max_rounds=6}(fold-constants, eliminate-identity),eliminate-dead-code"
    specs = parse(text)
    assert specs[1].name == "fixed-point" and [s.name for s in specs[1].body] == ["fold-constants",
                                                                               "eliminate-identity"]
    canonical = format_pipeline(specs)
    assert canonical == "lift-constants,fixed-point{max_rounds=6}(fold-constants,eliminate-identity),eliminate-dead-code"
    resolved = resolve(text)
    assert resolved[1].options == {"max_rounds": 6} and resolved[1].is_group
    # a target pipeline name inside a group expands there; default options are dropped
    nested = resolve("fixed-point{max_rounds=4}(cleanup)", {"cleanup": "eliminate-identity,eliminate-dead-code"})
    assert format_pipeline(nested) == "fixed-point(eliminate-identity,eliminate-dead-code)"


@pytest.mark.parametrize("text,message", [
    ("fixed-point()", "empty group"),
    ("fixed-point", "needs a pipeline in parentheses"),
    ("fixpoint(eliminate-identity)", "did you mean 'fixed-point'"),
    ("fixed-point(quantize-dynamic)", "only lossless passes"),
    ("fixed-point{max_rounds=0}(eliminate-identity)", "at least 1"),
    ("fixed-point{rounds=2}(eliminate-identity)", "has no option 'rounds'"),
    ("fixed-point(eliminate-identity", r"expected '\)'"),
])
def test_fixed_point_group_errors(text, message):
    with pytest.raises(PipelineError, match=message):
        resolve(text)
