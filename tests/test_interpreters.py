"""Interpreter backends and answer parsing: the openai backend against a real HTTP server (retries,
back-off, Retry-After, timeouts, dropped connections, fatal statuses, prices), the azure backend through
the real ``openai.AzureOpenAI`` client against a server that checks Azure's URL and ``api-key`` header,
the local backend on a tiny real model, prompt templates, and answer parsing over many shapes."""

import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai_server import FakeOpenAI, Reply

from routesae.errors import ConfigError, RouteSAEError
from routesae.interpreters.answers import CATEGORIES, Explanation, parse_detection, parse_explanation
from routesae.interpreters.azure import AzureConfig, AzureInterpreter
from routesae.interpreters.base import InterpreterError, InterpreterUnavailable
from routesae.interpreters.local import LocalConfig, LocalInterpreter, answer_prefix
from routesae.interpreters.openai import DEFAULT_PRICES, OpenAIConfig, OpenAIInterpreter, _retry_after
from routesae.interpreters.templates import load_template, placeholders, render_classes, render_numbered

SECRET = "sk-test-SECRET-7f3a9c"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Explain lat3."}]


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def openai_backend(server, **settings):
    return OpenAIInterpreter(OpenAIConfig(base_url=server.base_url, backoff=0.01, max_backoff=0.05, **settings))


# -- answer parsing ----------------------------------------------------------------------------------

PARSED = [
    ("Feature category: Low-level\nScore: 4\nExplanation: the word Paris", ("low-level", 4, "the word Paris")),
    ("**Feature category:** High-Level\n**Score:** 5/5\n**Explanation:** lists of items", ("high-level", 5, "lists of items")),
    ("## Answer\n- **Feature category**: low level\n- **Score**: 3\n- **Explanation**: capitals", ("low-level", 3, "capitals")),
    ("Sure, here is my analysis.\n\nFeature category: Undiscernible\nScore: 1\nExplanation: noise.\n\nLet me know!",
     ("undiscernible", 1, "noise.")),
    ("feature category: HIGH_LEVEL\nscore: 2\nexplanation: x", ("high-level", 2, "x")),
    ("Feature category: high-level\nScore: 2 out of 5\nExplanation: enumerations", ("high-level", 2, "enumerations")),
    ("Score: 4\nExplanation: dates\nFeature category: Low-level", ("low-level", 4, "dates")),
    ("Feature category: Low-level, Score: 5, Explanation: the token 'the'", ("low-level", 5, "the token 'the'")),
    ("Feature category: Low-level | Score: 4 | Explanation: numbers", ("low-level", 4, "numbers")),
    ("Category: indiscernible\nMonosemanticity score: 1\nExplanation: nothing shared", ("undiscernible", 1, "nothing shared")),
    (("Feature category: [Low-level/High-level/Undiscernible]\nScore: [5/4/3/2/1]\nExplanation: [brief]\n\n"
     "Feature category: High-level\nScore: 3\nExplanation: questions"), ("high-level", 3, "questions")),
    ("### Feature category:\nLow-level\n### Score:\n4\n### Explanation:\nParis, the city.", ("low-level", 4, "Paris, the city.")),
    ("Feature category: Low-level\nScore (1-5): 4\nExplanation: x", ("low-level", 4, "x")),
    ("Feature category: `Low-level`\nScore: **4**\nExplanation: code", ("low-level", 4, "code")),
    ("Feature category: Low-level\nScore: 4.0\nExplanation: y", ("low-level", 4, "y")),
    # unreadable answers
    ("Feature category: Low-level\nScore: 4.5\nExplanation: y", None),
    ("Feature category: Low-level\nScore: 7\nExplanation: y", None),
    ("Feature category: Low-level or high-level\nScore: 3\nExplanation: y", None),
    ("Feature category: Medium-level\nScore: 3\nExplanation: y", None),
    ("Feature category: Low-level\nScore: 3", None),
    ("I cannot tell what this feature does.", None),
    ("", None),
    ("the the the assistant assistant", None),
]


@pytest.mark.parametrize(("answer", "expected"), PARSED)
def test_explanations_parse_across_answer_shapes(answer, expected):
    got = parse_explanation(answer)
    assert (None if got is None else (got.category, got.score, got.explanation)) == expected


@given(
    category=st.sampled_from(CATEGORIES),
    spelling=st.sampled_from(["{}", "{upper}", "{title}", "{space}"]),
    score=st.integers(1, 5),
    score_form=st.sampled_from(["{}", "{}/5", "{} out of 5", "[{}]"]),
    words=st.lists(st.sampled_from(["fires", "on", "Paris", "lists", "dates", "the", "word", "commas"]), min_size=1, max_size=8),
    label_case=st.sampled_from([str.lower, str.title, str.upper, lambda s: s]),
    bold=st.booleans(),
    bullet=st.sampled_from(["", "- ", "* ", "1. "]),
    order=st.permutations([0, 1, 2]),
    preamble=st.sampled_from(["", "Here is my analysis.\n\n", "## Feature analysis\n"]),
    postscript=st.sampled_from(["", "\n\nI hope this helps.", "\n\n---\nNote: the contexts were short."]),
)
def test_parsing_recovers_what_any_decorated_answer_says(
    category, spelling, score, score_form, words, label_case, bold, bullet, order, preamble, postscript
):
    low, high = category.split("-") if "-" in category else (category, "")
    shown = spelling.format(category, upper=category.upper(), title=category.title(), space=f"{low} {high}".strip())
    explanation = " ".join(words)
    labels = [label_case("Feature category"), label_case("Score"), label_case("Explanation")]
    values = [shown, score_form.format(score), explanation]
    lines = [f"{bullet}{'**' if bold else ''}{labels[i]}:{'**' if bold else ''} {values[i]}" for i in order]
    answer = preamble + "\n".join(lines) + postscript
    assert parse_explanation(answer) == Explanation(category, score, explanation)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Activating: 1, 3", {1, 3}),
        ("**Activating:** 2 and 4", {2, 4}),
        ("Activating: none", set()),
        ("None.", set()),
        ("1, 2, 5", {1, 2, 5}),
        ("Activating: 2 (mentions 1905), 3", {2, 3}),
        ("Reasoning first.\nActivating: 6\nBecause 6 says Paris.", {6}),
        ("Activating: 1, 9", None),  # 9 is not an excerpt: the model lost track
        ("Activating: excerpts 2 and 5.", {2, 5}),
        ("Activating: 1. The Ramayana, also known as the Valmiki Ramayana, is", None),  # a copied excerpt
        ("Activating: 1, 3 because they mention Paris", None),
        ("Excerpt 3 looks right to me", None),
        ("", None),
    ],
)
def test_detection_answers_parse(answer, expected):
    assert parse_detection(answer, 6) == expected


# -- templates -----------------------------------------------------------------------------------------

def test_builtin_templates_have_exactly_their_placeholders():
    assert placeholders(load_template("explain").text) == {"contexts"}
    assert placeholders(load_template("detect").text) == {"explanation", "contexts", "count"}


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("explain", "Explain: $context", "unknown placeholder(s) $context; missing required placeholder(s) $contexts"),
        ("explain", "Nothing to fill in", "missing required placeholder(s) $contexts"),
        ("detect", "$explanation ${contexts} $count $latent $numbers", "unknown placeholder(s) $numbers"),
        ("explain", "$contexts costs 5$", "line 1: a '$' that starts no placeholder"),
    ],
)
def test_bad_templates_are_refused_naming_the_problem(tmp_path, kind, text, message):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match="--(prompt|detection)-template") as err:
        load_template(kind, path)
    assert message in str(err.value)


def test_a_custom_template_renders_and_records_its_path(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Latent $latent costs $$5:\n$contexts")
    template = load_template("explain", path)
    assert template.name == str(path) and len(template.sha256) == 64
    assert template.render(contexts="C", latent=7) == "Latent 7 costs $5:\nC"
    with pytest.raises(ConfigError, match="cannot read it"):
        load_template("explain", tmp_path / "missing.txt")


def _context(tokens, index, activation):
    return {"tokens": tokens, "index": index, "activation": activation, "layer": 2, "document": 0, "position": 1}


def test_contexts_render_strongest_class_first_with_marked_tokens():
    latent = {"classes": {
        "a": [_context(["x", " a", "\ny"], 1, 3.14159)],
        "paris": [_context(["In", " Paris", "."], 1, 17.0), _context(["Paris", " is"], 0, 27.53)],
    }}
    assert render_classes(latent) == (
        'Token "paris":\n- activation 27.5: <<Paris>> is\n- activation 17.0: In<< Paris>>.\n\n'
        'Token "a":\n- activation 3.14: x<< a>>\\ny'
    )
    assert render_numbered([_context(["a", "b"], 1, 1.0), _context(["c"], None, 0.0)]) == "1. ab\n2. c"


# -- the openai backend, over real HTTP ----------------------------------------------------------------

def test_missing_key_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY environment variable"):
        OpenAIInterpreter()


def test_an_answer_with_usage_and_cost(server, key):
    backend = openai_backend(server, price_input=1.0, price_output=2.0)
    c = backend.complete(MESSAGES, max_tokens=32, temperature=0.1)
    assert c.text.startswith("Feature category: Low-level")
    usage = server.log[0]["usage"]
    assert (c.prompt_tokens, c.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert c.cost_usd == pytest.approx((usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6)
    body = server.log[0]["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("gpt-4o-mini", 32, 0.1)
    assert server.log[0]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(backend.describe())


@pytest.mark.parametrize(
    "failure",
    [Reply(429, headers={"Retry-After": "0"}), Reply(500), Reply(503), Reply(drop=True), Reply(delay=1.0)],
    ids=["429", "500", "503", "dropped", "timeout"],
)
def test_transient_failures_are_retried(server, key, failure):
    server.script(failure, failure)
    backend = openai_backend(server, timeout=0.3)
    c = backend.complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert "Score: 4" in c.text
    assert len(server.log) == 3, "two failures, then the answer"


def test_retry_after_is_honoured(server, key):
    server.script(Reply(429, headers={"Retry-After": "0.4"}))
    start = time.monotonic()
    openai_backend(server).complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert time.monotonic() - start >= 0.4 and len(server.log) == 2


def test_retry_after_headers_parse():
    assert _retry_after({"retry-after": "2.5"}) == 2.5
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    assert _retry_after({}) is None
    assert _retry_after({"retry-after": "soon"}) is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 50 < _retry_after({"retry-after": in_a_minute}) <= 60


def test_retries_are_bounded_and_then_the_backend_is_unavailable(server, key):
    server.script(*[Reply(500)] * 10)
    with pytest.raises(InterpreterUnavailable, match="no answer after 3 attempts .*HTTP 500"):
        openai_backend(server, max_retries=2).complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert len(server.log) == 3


def test_an_unreachable_endpoint_is_unavailable(key):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    backend = OpenAIInterpreter(OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff=0.01))
    with pytest.raises(InterpreterUnavailable, match="connection failed"):
        backend.complete(MESSAGES, max_tokens=16, temperature=0.0)


def test_fatal_and_per_request_statuses(server, key):
    server.script(Reply(401))
    with pytest.raises(InterpreterUnavailable, match="HTTP 401.*OPENAI_API_KEY"):
        openai_backend(server).complete(MESSAGES, max_tokens=16, temperature=0.0)
    server.script(Reply(400))
    with pytest.raises(InterpreterError, match="HTTP 400") as err:
        openai_backend(server).complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert not isinstance(err.value, InterpreterUnavailable)
    assert len(server.log) == 2, "neither is retried"


def test_prices_come_from_flags_or_the_dated_table(key):
    assert OpenAIInterpreter(OpenAIConfig(model="gpt-4o")).cost(1_000_000, 1_000_000) == sum(DEFAULT_PRICES["gpt-4o"])
    described = OpenAIInterpreter(OpenAIConfig(model="gpt-4o-mini")).describe()
    assert described["price_input"] == 0.15 and "prices change" in described["prices"]
    unknown = OpenAIInterpreter(OpenAIConfig(model="my-local-llama"))
    assert unknown.cost(10, 10) is None and unknown.describe()["prices"] == "unknown"
    given_prices = OpenAIInterpreter(OpenAIConfig(model="my-local-llama", price_input=0.0, price_output=0.0))
    assert given_prices.cost(10, 10) == 0.0
    with pytest.raises(ConfigError, match="both --price-input and --price-output"):
        OpenAIConfig(price_input=1.0)


def test_missing_usage_counts_the_upper_bounds(server, key):
    server.script(Reply(usage=False))
    backend = openai_backend(server, price_input=1.0, price_output=1.0)
    c = backend.complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert (c.prompt_tokens, c.completion_tokens) == (backend.estimate_prompt_tokens(MESSAGES), 16)


# -- the azure backend, over real HTTP in Azure's dialect (the ``azure`` fixture: tests/conftest.py) -------

def azure_backend(server, **settings):
    options = {"azure_endpoint": server.endpoint, "api_version": server.api_version, "deployment": server.deployment,
               "backoff": 0.01, "max_backoff": 0.05, **settings}
    return AzureInterpreter(AzureConfig(**options))


def test_azure_asks_the_deployment_url_with_the_api_key_header(azure, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = azure_backend(azure, price_input=1.0, price_output=2.0)
    c = backend.complete(MESSAGES, max_tokens=32, temperature=0.1)
    assert c.text.startswith("Feature category: Low-level")
    (entry,) = azure.log
    assert entry["status"] == 200
    assert entry["path"] == f"/openai/deployments/{azure.deployment}/chat/completions?api-version={azure.api_version}"
    assert entry["api_key"] == azure.key and entry["authorization"] is None
    assert (entry["body"]["model"], entry["body"]["max_tokens"], entry["body"]["temperature"]) == (azure.deployment, 32, 0.1)
    usage = entry["usage"]
    assert c.cost_usd == pytest.approx((usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6)
    described = backend.describe()
    assert described == {"name": "azure", "model": azure.deployment, "azure_endpoint": azure.endpoint,
                         "api_version": azure.api_version, "timeout": 60.0, "max_retries": 5, "price_input": 1.0,
                         "price_output": 2.0, "prices": "given"}
    assert azure.key not in repr(described)


def test_azure_retries_a_429_through_the_real_client(azure):
    azure.script(Reply(429, headers={"Retry-After": "0"}), Reply(503))
    c = azure_backend(azure).complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert "Score: 4" in c.text
    assert [entry["status"] for entry in azure.log] == [429, 503, 200]
    assert len({entry["path"] for entry in azure.log}) == 1, "every attempt asks the same deployment URL"
    assert c.cost_usd is None, "a deployment's price is unknown unless given"


def test_the_server_refuses_what_azure_would_and_the_backend_says_what_to_check(azure, monkeypatch):
    with pytest.raises(InterpreterUnavailable, match="HTTP 404.*--deployment 'other'"):
        azure_backend(azure, deployment="other").complete(MESSAGES, max_tokens=16, temperature=0.0)
    with pytest.raises(InterpreterUnavailable, match="HTTP 404.*--api-version '2023-05-15'"):
        azure_backend(azure, api_version="2023-05-15").complete(MESSAGES, max_tokens=16, temperature=0.0)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "a-wrong-key")
    with pytest.raises(InterpreterUnavailable, match="HTTP 401.*check AZURE_OPENAI_API_KEY") as refused:
        azure_backend(azure).complete(MESSAGES, max_tokens=16, temperature=0.0)
    assert "a-wrong-key" not in str(refused.value)
    assert [entry["status"] for entry in azure.log] == [404, 404, 401], "none is retried"


def test_azure_settings_and_key_are_required(azure, monkeypatch):
    with pytest.raises(ConfigError, match="needs --api-version, --deployment .*--interpreter-api-version"):
        AzureConfig(azure_endpoint=azure.endpoint)
    with pytest.raises(ConfigError, match="needs --azure-endpoint, --api-version, --deployment"):
        AzureInterpreter()
    with pytest.raises(ConfigError, match="must be an http\\(s\\) URL"):
        AzureConfig(azure_endpoint="NAME.openai.azure.com", api_version=azure.api_version, deployment=azure.deployment)
    pasted = f"{azure.endpoint}/openai/deployments/{azure.deployment}/chat/completions?api-version={azure.api_version}"
    with pytest.raises(ConfigError, match="resource's address alone .*--deployment and --api-version"):
        AzureConfig(azure_endpoint=pasted, api_version=azure.api_version, deployment=azure.deployment)
    monkeypatch.delenv("AZURE_OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the other backend's key is not taken
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY environment variable, which is not set"):
        azure_backend(azure)
    assert azure.log == []


# -- the local backend, on a tiny real model -----------------------------------------------------------

def test_local_backend_generates_with_the_chat_template(tiny_model_dir):
    backend = LocalInterpreter(LocalConfig(model=str(tiny_model_dir)))
    first = backend.complete(MESSAGES, max_tokens=6, temperature=0.1)
    again = backend.complete(MESSAGES, max_tokens=6, temperature=0.1)
    assert first == again, "greedy decoding is reproducible"
    assert 1 <= first.completion_tokens <= 6 and first.cost_usd == 0.0
    assert first.prompt_tokens == backend.estimate_prompt_tokens(MESSAGES) > 0
    assert backend.describe()["model_path"] == str(tiny_model_dir)
    assert "model_path" not in LocalInterpreter().describe(), "the embedded model is not converted just to describe it"


def test_local_backend_refuses_what_it_cannot_run(tiny_model_dir, tmp_path):
    with pytest.raises(RouteSAEError, match="not a local model directory"):
        LocalInterpreter(LocalConfig(model="some-org/some-model"))
    long_prompt = [{"role": "user", "content": "Paris " * 600}]
    with pytest.raises(InterpreterError, match="reads at most 512"):
        LocalInterpreter(LocalConfig(model=str(tiny_model_dir))).complete(long_prompt, max_tokens=8, temperature=0.0)


@pytest.mark.parametrize(
    ("prompt", "prefix"),
    [
        (load_template("explain").text, "Feature category:"),
        (load_template("detect").text, "Activating:"),
        ("Which?\nReply in this format, nothing else:\nVerdict one: <yes or no>\nWhy: <reason>", "Verdict one:"),
        ("An old format:\nA: x\n\nThe format to use:\n  B: <y>", "B:"),
        ("Describe it.\nFeature category:\nScore:\nExplanation:", None),  # no line introduces the format
        ("The format is free.\nFeature category: x", None),
        ("Answer in this format:\n<category>: <score>", None),  # a placeholder is not a label
    ],
)
def test_the_answer_prefix_is_the_first_label_of_the_prompts_format(prompt, prefix):
    assert answer_prefix(prompt) == prefix


def test_local_backend_prefills_the_answer_with_the_formats_first_label(tiny_model_dir):
    backend = LocalInterpreter(LocalConfig(model=str(tiny_model_dir)))
    asked = [{"role": "user", "content": "Which excerpts?\nAnswer in exactly this format:\nActivating: <numbers>"}]
    tokenizer, _ = backend._model()
    fed = tokenizer.decode(backend._prompt_ids(backend._prefilled(asked)[0])[0])
    assert fed.endswith("assistant\nActivating:"), "the assistant turn is opened and started, not closed"
    answer = backend.complete(asked, max_tokens=6, temperature=0.0)
    assert answer.text.startswith("Activating:") and 1 <= answer.completion_tokens <= 6
    assert answer.prompt_tokens == backend.estimate_prompt_tokens(asked)
    plain = LocalInterpreter(LocalConfig(model=str(tiny_model_dir), prefill=False))
    assert plain.estimate_prompt_tokens(asked) < answer.prompt_tokens, "--no-prefill leaves the assistant turn empty"
    started = backend.complete([*asked, {"role": "assistant", "content": "Activating: 2"}], max_tokens=4,
                               temperature=0.0)
    assert started.text.startswith("Activating: 2"), "a conversation ending with the assistant is continued as it is"


def test_local_repetition_settings_apply_and_are_checked(tiny_model_dir):
    asked = [{"role": "user", "content": "Answer in this format:\nActivating: <numbers>"}]
    loose = LocalInterpreter(LocalConfig(model=str(tiny_model_dir))).complete(asked, max_tokens=8, temperature=0.0)
    strict = LocalInterpreter(LocalConfig(model=str(tiny_model_dir), repetition_penalty=1e6, no_repeat_ngram_size=2))
    first, again = (strict.complete(asked, max_tokens=8, temperature=0.0) for _ in range(2))
    assert first == again and first.text.startswith("Activating:") and first.prompt_tokens == loose.prompt_tokens
    assert first.text != loose.text, "the penalties change what greedy decoding picks"
    assert LocalConfig.from_dict({"repetition_penalty": 1}).repetition_penalty == 1.0
    with pytest.raises(ConfigError, match="repetition_penalty must be positive"):
        LocalConfig(repetition_penalty=0.0)
    with pytest.raises(ConfigError, match="no_repeat_ngram_size must be >= 0"):
        LocalConfig(no_repeat_ngram_size=-1)
