"""Structured outputs on the tiny random-weight model.

Unconstrained, the model's sampled text is noise, so an output that is valid
JSON for a schema, fully matches a regex or is one of the choices shows the
constraint at work, not luck.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import spyre_cb
from spyre_cb import InvalidRequestError, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer", "minimum": -100, "maximum": 100}, "maxItems": 3},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "role", "address", "scores"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
CHOICES = ["red", "green", "blue", 'say "hi"\n']
POLICIES = [
    {"policy": "continuous"},
    {"policy": "chunked", "chunk_size": 64, "prefix_caching": True},
]


@pytest.fixture(scope="module", params=[0, 1], ids=["continuous", "chunked-prefix"])
def llm(request, tiny_model):
    return spyre_cb.LLM(tiny_model, max_num_seqs=8, max_model_len=512, **POLICIES[request.param])


@pytest.fixture(scope="module")
def cont(tiny_model):
    return spyre_cb.LLM(tiny_model, max_num_seqs=8, max_model_len=512)


def params(so: StructuredOutputsParams, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 256, "temperature": 1.0, **kw}, structured_outputs=so)


def texts(outs):
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def test_json_schema_outputs_validate_and_stop(llm):
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    prompts = ["The river was", "A", "Write a record:"] * 17
    outs = llm.generate(prompts[:50], [params(so, seed=i) for i in range(50)], use_tqdm=False)
    got = texts(outs)
    stopped = [t for t, why in got if why == "stop"]
    assert len(stopped) >= 45, f"only {len(stopped)} of 50 ended with stop"
    for t in stopped:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len({t for t in stopped}) > 10  # sampled, not one forced string


def test_json_schema_with_free_whitespace_still_validates(cont):
    # vLLM's default: whitespace between JSON tokens is free (a weak model may use lots of it)
    so = StructuredOutputsParams(json=json.dumps(SCHEMA))
    outs = cont.generate(["The river was"] * 8, [params(so, seed=100 + i) for i in range(8)], use_tqdm=False)
    stopped = [t for t, why in texts(outs) if why == "stop"]
    assert stopped
    for t in stopped:
        jsonschema.validate(json.loads(t), SCHEMA)


def test_properties_come_in_the_schemas_order(cont):
    """As in vLLM, the grammar keeps the order of the schema's properties (the
    cache key's canonical form sorts every other key)."""
    for order in (["zeta", "alpha", "mid"], ["alpha", "mid", "zeta"]):
        schema = {
            "type": "object",
            "properties": {k: {"type": "string", "enum": ["a", "b"]} for k in order},
            "required": order,
            "additionalProperties": False,
        }
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        outs = cont.generate(["x"] * 4, [params(so, seed=i, max_tokens=64) for i in range(4)], use_tqdm=False)
        for t, why in texts(outs):
            assert why == "stop" and list(json.loads(t)) == order, t


def test_regex_choice_and_grammar_match_every_output(llm):
    n = 20
    regex = llm.generate(
        ["x"] * n, [params(StructuredOutputsParams(regex=REGEX), seed=i) for i in range(n)], use_tqdm=False
    )
    for t, why in texts(regex):
        assert why == "stop" and re.fullmatch(REGEX, t), t
    choice = llm.generate(
        ["x"] * n, [params(StructuredOutputsParams(choice=CHOICES), seed=i) for i in range(n)], use_tqdm=False
    )
    got = texts(choice)
    assert all(why == "stop" and t in CHOICES for t, why in got), got
    assert len({t for t, _ in got}) > 1
    grammar = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]{0,2}'
    outs = llm.generate(
        ["x"] * n, [params(StructuredOutputsParams(grammar=grammar), seed=i) for i in range(n)], use_tqdm=False
    )
    stopped = [t for t, why in texts(outs) if why == "stop"]
    assert len(stopped) >= n // 2
    for t in stopped:
        assert re.fullmatch(r"\([1-9][0-9]{0,2}(,[1-9][0-9]{0,2})*\)", t), t


def test_json_object_parses_to_a_dict(cont):
    so = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    outs = cont.generate(["x"] * 12, [params(so, seed=i) for i in range(12)], use_tqdm=False)
    stopped = [t for t, why in texts(outs) if why == "stop"]
    assert stopped
    for t in stopped:
        assert isinstance(json.loads(t), dict), t


def test_unconstrained_requests_get_the_same_tokens_in_a_mixed_batch(cont):
    plain = [
        SamplingParams(max_tokens=24, seed=7),
        SamplingParams(max_tokens=24, temperature=0),
        SamplingParams(max_tokens=24, seed=9, top_p=0.9, logprobs=2),
    ]
    prompts = ["The river was", "A", "Write"]
    alone = cont.generate(prompts, plain, use_tqdm=False)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    mixed_params = [
        plain[0],
        params(so, seed=1),
        plain[1],
        params(StructuredOutputsParams(regex=REGEX), seed=2),
        plain[2],
    ]
    mixed = cont.generate([prompts[0], "x", prompts[1], "y", prompts[2]], mixed_params, use_tqdm=False)
    for a, m in zip(alone, [mixed[0], mixed[2], mixed[4]]):
        assert a.outputs[0].token_ids == m.outputs[0].token_ids
        # (the batch's shape changes the forward's rounding, not the tokens)
        la, lm = a.outputs[0].logprobs, m.outputs[0].logprobs
        assert (la is None) == (lm is None)
        for x, y in zip(la or [], lm or []):
            assert list(x) == list(y) and [e.logprob for e in x.values()] == pytest.approx(
                [e.logprob for e in y.values()], abs=1e-4
            )


def test_seeds_reproducible_and_n_completions_each_valid(llm):
    so = StructuredOutputsParams(regex=REGEX)
    p = params(so, n=3, seed=11)
    a = llm.generate(["x"], p, use_tqdm=False)[0]
    # the same request again, now next to another constrained request: same tokens
    b = llm.generate(["x", "y"], [p, params(StructuredOutputsParams(choice=CHOICES), seed=3)], use_tqdm=False)[0]
    assert len(a.outputs) == 3
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({c.text for c in a.outputs}) > 1
    for c in a.outputs:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text)


def test_logprobs_are_the_models_distribution(cont):
    # the first token's logprobs (same prompt, same logits) are those of the unconstrained model
    so = StructuredOutputsParams(choice=["zzzz", "qqqq"])
    free = cont.generate(["The river was"], SamplingParams(max_tokens=1, temperature=0, logprobs=3), use_tqdm=False)
    cons = cont.generate(["The river was"], params(so, temperature=0, logprobs=3), use_tqdm=False)
    f, c = free[0].outputs[0], cons[0].outputs[0]
    assert c.text in ("zzzz", "qqqq")
    top_free = {t: lp.logprob for t, lp in f.logprobs[0].items() if lp.rank <= 3}
    top_cons = {t: lp.logprob for t, lp in c.logprobs[0].items() if lp.rank <= 3}
    assert top_cons == pytest.approx(top_free)
    assert c.token_ids[0] not in top_free or c.token_ids[0] in c.logprobs[0]  # the chosen one is there too


def test_chat_takes_structured_outputs(cont):
    so = StructuredOutputsParams(choice=["yes", "no"])
    out = cont.chat([{"role": "user", "content": "Is it?"}], params(so, seed=0), use_tqdm=False)
    assert out[0].outputs[0].text in ("yes", "no")


@pytest.mark.parametrize(
    "spec, words",
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
        (dict(json="{not json"), "not valid JSON"),
        (dict(regex="[a-z"), "regex"),
        (dict(grammar="root ::= undefined_rule"), "grammar"),
    ],
)
def test_an_invalid_spec_is_refused_at_submission(tiny_model, spec, words):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    with pytest.raises(InvalidRequestError, match=f"structured_outputs.*{words}|{words}.*"):
        eng.add_request("r", prompt="x", sampling_params=params(StructuredOutputsParams(**spec), max_tokens=32))
    assert not eng.has_unfinished_requests() and eng.n_waiting == 0 and not eng.requests
    eng.add_request("r", prompt="x", sampling_params=SamplingParams(max_tokens=2))  # the id is still free


def test_exactly_one_kind_and_compiled_once(tiny_model):
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError, match="exactly one.*regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    for i in range(3):  # equal specs, built separately (the dict's key order differs too)
        schema = dict(reversed(list(SCHEMA.items()))) if i else SCHEMA
        eng.add_request(str(i), prompt="x", sampling_params=params(StructuredOutputsParams(json=schema), max_tokens=32))
    assert (eng.grammars.misses, eng.grammars.hits) == (1, 2)


def test_a_failing_matcher_ends_its_request_alone(tiny_model):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    eng.add_request("ok", prompt="The river was", sampling_params=SamplingParams(max_tokens=8, seed=1))
    eng.add_request("bad", prompt="x", sampling_params=params(StructuredOutputsParams(regex=REGEX), max_tokens=32))
    eng.step()
    eng.step()  # both prefilled

    class Broken:
        def fill_next_token_bitmask(self, *a):
            raise RuntimeError("matcher broke")

    eng.sampler._matchers["bad"] = Broken()
    outs = {o.request_id: o for o in eng.step()}
    assert outs["bad"].finish_reason == "abort" and "matcher broke" in outs["bad"].error
    while eng.has_unfinished_requests():
        eng.step()
    alone = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=128)
    ref = alone.generate(["The river was"], SamplingParams(max_tokens=8, seed=1), use_tqdm=False)[0]
    assert eng.get_request("ok").output_token_ids == ref.outputs[0].token_ids


def test_tensor_parallel_gives_the_same_constrained_tokens(tiny_model, cont):
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    ps = [params(StructuredOutputsParams(regex=REGEX), seed=1), params(so, seed=2, max_tokens=48)]
    ps.append(SamplingParams(max_tokens=16, seed=3))
    prompts = ["x", "The river was", "A"]
    ref = cont.generate(prompts, ps, use_tqdm=False)
    tp = spyre_cb.LLM(tiny_model, max_num_seqs=8, max_model_len=512, tensor_parallel_size=2)
    try:
        got = tp.generate(prompts, ps, use_tqdm=False)
    finally:
        tp.engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert re.fullmatch(REGEX, got[0].outputs[0].text)
