"""The interpretation protocol end to end: a real HTTP server behind the real openai client, the local
backend on a tiny model over a real ``extract_contexts`` output, budget stops, resume, refusals,
the CLI, and a third-party interpreter registered through the plugin manager."""

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from openai_server import FakeOpenAI, Reply

import routesae
from routesae.cli import make_cli
from routesae.errors import ConfigError, RouteSAEError
from routesae.hookspecs import hookimpl
from routesae.interpret import BudgetReached, InterpretationStopped, interpret, sample_latents
from routesae.interpreters.base import Completion, Interpreter, InterpreterConfig
from routesae.plugins import get_plugin_manager

SECRET = "sk-test-SECRET-5e1d0b"
LATENTS = [3, 17, 42, 99, 230, 512]


def _ctx(tokens, index, activation, document=0):
    return {"tokens": tokens, "index": index, "activation": activation, "layer": None if index is None else 2,
            "document": document, "position": 0 if index is None else index}


def write_contexts(sae_dir, latents=LATENTS, held_out=2):
    """A contexts.json that follows the agreed schema; activating held-out contexts say ``ACT`` so the
    test server can answer detection questions right, and every context names its latent (``latN``)."""
    sae_dir.mkdir(parents=True, exist_ok=True)
    pool = [_ctx(["Plain", " text", f" number {i}", "."], None, 0.0, document=100 + i) for i in range(8)]
    records = {}
    for n, latent in enumerate(latents):
        records[str(latent)] = {
            "activations": 40 + n,
            "max_activation": 30.0 + n,
            "classes": {
                "paris": [_ctx(["The", " city", f" lat{latent}", " Paris"], 3, 30.0 + n), _ctx(["In", " Paris"], 1, 21.25)],
                "rome": [_ctx(["Rome", f" lat{latent}"], 0, 16.5)],
            },
            "held_out": [_ctx(["ACT", f" lat{latent}", f" held {h}"], 0, 18.0) for h in range(held_out)],
            "non_activating": [(n + i) % len(pool) for i in range(4)],
        }
    data = {
        "format": "routesae.contexts", "format_version": 1, "routesae_version": routesae.__version__,
        "sae": sae_dir.name, "architecture": "topk", "model": "tiny", "latent_size": 1024,
        "settings": {"threshold": 15.0, "window": 64, "top_per_class": 2, "max_classes": 32, "min_contexts": 3,
                     "held_out": held_out, "infer_k": None, "theta": None, "tokens": 5000,
                     "data": {"source": "test", "split": "apply", "fingerprint": "abc"}},
        "interpretable_latents": len(latents),
        "latents": records,
        "pool": pool,
    }
    (sae_dir / "contexts.json").write_text(json.dumps(data, indent=2))
    return sae_dir


def latents_asked(server, since=0):
    return [int(re.search(r"lat(\d+)", p).group(1)) for p in server.prompts()[since:]]


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


@pytest.fixture
def sae_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return write_contexts(tmp_path / "topk-L2-k4-F1024")


def run(sae_dir, server, **kwargs):
    options = {"base_url": server.base_url, "backoff": 0.01, "max_backoff": 0.05, "concurrency": 1, "progress": False,
               **kwargs}
    return interpret(sae_dir, "openai", **options)


def read(sae_dir):
    return json.loads((sae_dir / "interpretations.json").read_text())


def test_sample_is_seeded_sorted_and_all_when_fewer():
    assert sample_latents(LATENTS, 3, 42) == sample_latents(list(reversed(LATENTS)), 3, 42)
    assert sample_latents(LATENTS, 3, 42) == sorted(sample_latents(LATENTS, 3, 42))
    assert {tuple(sample_latents(LATENTS, 3, seed)) for seed in range(10)} != {tuple(sample_latents(LATENTS, 3, 42))}
    assert sample_latents(LATENTS, 100, 1) == LATENTS


def test_a_full_run_scores_explains_detects_and_accounts(sae_dir, server):
    doc = run(sae_dir, server, sample=4, concurrency=3, price_input=1.0, price_output=2.0)
    assert doc == read(sae_dir)
    assert doc["sampled"] == sample_latents(LATENTS, 4, 42) and doc["complete"] is True
    assert sorted(latents_asked(server)) == sorted(doc["sampled"] * 2), "one explanation and one detection each"
    for record in doc["latents"].values():
        assert (record["status"], record["category"], record["score"]) == ("done", "low-level", 4)
        assert record["explanation"] == "the feature fires on one word."
        detection = record["detection"]
        assert detection["n"] == 4 and len(detection["truth"]) == 2, "two held-out positives and two pool negatives"
        assert (detection["accuracy"], detection["correct"], detection["predicted"]) == (1.0, 4, detection["truth"])
    summary = doc["summary"]
    assert (summary["features_scored"], summary["unparsable"], summary["errors"], summary["average_score"]) == (4, 0, 0, 4.0)
    assert summary["categories"]["low-level"] == {"count": 4, "mean_score": 4.0}
    assert summary["categories"]["high-level"] == {"count": 0, "mean_score": None}
    assert summary["detection_accuracy"] == 1.0
    served = [entry["usage"] for entry in server.log]
    assert doc["usage"]["requests"] == 8
    assert doc["usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in served)
    assert doc["usage"]["completion_tokens"] == sum(u["completion_tokens"] for u in served)
    expected_cost = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0 for u in served) / 1e6
    assert doc["usage"]["cost_usd"] == pytest.approx(expected_cost)
    assert sum(r["usage"]["cost_usd"] for r in doc["latents"].values()) == pytest.approx(expected_cost)
    assert doc["interpreter"]["base_url"].startswith(server.base_url) and doc["prompt_template"]["name"] == "builtin"
    explain_prompt = server.prompts()[0]
    assert "Token \"paris\":\n- activation 3" in explain_prompt and "<< Paris>>" in explain_prompt
    detect_prompt = next(p for p in server.prompts() if "Activating:" in p)
    assert "<<" not in detect_prompt.split("numbered text excerpts")[1]


def test_retries_and_odd_answers_are_recorded_honestly(sae_dir, server):
    server.script(
        Reply(429, headers={"Retry-After": "0"}), Reply(),        # latent 1: a 429, then its explanation
        Reply(),                                                   # its detection
        Reply(500), Reply(text="**Feature category:** High-Level\n**Score:** 5/5\n**Explanation:** capitals"),
        Reply(text="Activating: 1, 2, 3, 4"),                      # says all four: two right, two wrong
        Reply(text="I am not sure what this feature does."),     # latent 3: unreadable, so no detection
    )
    doc = run(sae_dir, server, sample=3)
    first, second, third = (doc["latents"][str(i)] for i in doc["sampled"])
    assert [e["status"] for e in server.log[:4]] == [429, 200, 200, 500], "both failures were retried"
    assert first["status"] == "done" and first["detection"]["accuracy"] == 1.0
    assert (second["category"], second["score"], second["explanation"]) == ("high-level", 5, "capitals")
    assert (second["detection"]["accuracy"], second["detection"]["correct"]) == (0.5, 2)
    assert (third["status"], third["category"], third["score"], third["detection"]) == ("unparsable", None, None, None)
    assert third["answer"] == "I am not sure what this feature does."
    summary = doc["summary"]
    assert (summary["features_scored"], summary["unparsable"], summary["average_score"]) == (2, 1, 4.5)
    assert summary["detection_accuracy"] == 0.75
    assert len(server.log) == 7


def test_resume_skips_finished_latents_and_retries_only_what_is_asked(sae_dir, server):
    server.script(Reply(), Reply(text="maybe?"), Reply(text="no idea"))  # an unreadable detection, then explanation
    first = run(sae_dir, server, sample=3)
    one, two, three = first["sampled"]
    assert first["latents"][str(one)]["detection"]["status"] == "unparsable"
    assert first["latents"][str(two)]["status"] == "unparsable" and first["summary"]["unparsable"] == 1
    assert first["summary"]["detection_scored"] == 1
    asked = len(server.log)
    again = run(sae_dir, server, sample=3)
    assert len(server.log) == asked, "nothing new to do"
    assert again["latents"] == first["latents"]
    retried = run(sae_dir, server, sample=3, retry_unparsable=True)
    assert latents_asked(server, asked) == [one, two, two], "only the unreadable detection and explanation"
    assert retried["latents"][str(three)] == first["latents"][str(three)]
    assert retried["summary"]["features_scored"] == 3 and retried["summary"]["detection_scored"] == 3
    assert retried["usage"]["requests"] == first["usage"]["requests"] + 3


def test_the_budget_stops_cleanly_and_a_later_run_finishes(sae_dir, server):
    prices = {"price_input": 1000.0, "price_output": 1000.0}  # $0.001 a token: a request costs about a dollar
    with pytest.raises(BudgetReached, match="budget reached.*Run the same command again") as err:
        run(sae_dir, server, sample=6, max_cost=4.0, **prices)
    stopped = read(sae_dir)
    assert err.value.result == stopped
    assert 0 < stopped["usage"]["cost_usd"] <= 4.0
    assert stopped["complete"] is False and stopped["summary"]["pending"] > 0
    finished_before = {k for k, r in stopped["latents"].items() if r["detection"] is not None}
    asked = len(server.log)
    done = run(sae_dir, server, sample=6, **prices)
    assert done["complete"] is True and done["summary"]["features_scored"] == 6
    assert not {str(i) for i in latents_asked(server, asked)} & finished_before, "finished latents are not asked again"
    assert done["usage"]["requests"] == len(server.log) == 12


def test_an_unreachable_endpoint_stops_and_keeps_finished_work(sae_dir, server):
    server.script(Reply(), Reply(), *[Reply(drop=True)] * 2)
    with pytest.raises(InterpretationStopped, match="gave no answer after 2 attempts.*1 of 3 latents are finished"):
        run(sae_dir, server, sample=3, max_retries=1)
    kept = read(sae_dir)
    first = str(kept["sampled"][0])
    assert kept["latents"][first]["status"] == "done" and kept["latents"][first]["detection"]["status"] == "done"
    assert [r["status"] for k, r in kept["latents"].items() if k != first] == ["error"]
    resumed = run(sae_dir, server, sample=3)
    assert resumed["summary"]["features_scored"] == 3 and resumed["summary"]["errors"] == 0


def test_changed_inputs_are_refused_until_overwrite(sae_dir, server):
    run(sae_dir, server, sample=2)
    with pytest.raises(RouteSAEError, match="seed: 42 then, 7 now.*--overwrite"):
        run(sae_dir, server, sample=2, seed=7)
    template = sae_dir / "mine.txt"
    template.write_text("Explain this feature.\n$contexts\nFeature category: ...\nScore: ...\nExplanation: ...")
    with pytest.raises(RouteSAEError, match="prompt template"):
        run(sae_dir, server, sample=2, prompt_template=template)
    contexts = json.loads((sae_dir / "contexts.json").read_text())
    contexts["settings"]["threshold"] = 10.0
    (sae_dir / "contexts.json").write_text(json.dumps(contexts))
    asked = len(server.log)
    with pytest.raises(RouteSAEError, match=r"contexts\.json \(it changed since\)"):
        run(sae_dir, server, sample=2)
    assert len(server.log) == asked
    fresh = run(sae_dir, server, sample=2, prompt_template=template, overwrite=True)
    assert fresh["prompt_template"]["name"] == str(template) and fresh["summary"]["features_scored"] == 2
    assert server.prompts()[-2].startswith("You are an assistant") and "Explain this feature." in server.prompts()[-2]


def test_bad_requests_fail_before_any_request(sae_dir, server, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.txt"
    bad.write_text("Explain $contexts for $feature")
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \$feature"):
        run(sae_dir, server, prompt_template=bad)
    with pytest.raises(ConfigError, match="needs prices.*'my-llama'"):
        run(sae_dir, server, model="my-llama", max_cost=1.0)
    with pytest.raises(RouteSAEError, match="no contexts.json: run `routesae contexts"):
        run(tmp_path / "elsewhere", server)
    with pytest.raises(ConfigError, match="at most 1 request"):
        interpret(sae_dir, "local", model=str(tiny_model_dir), concurrency=2, progress=False)
    assert server.log == [] and not (sae_dir / "interpretations.json").exists()


def test_cli_runs_reports_and_never_leaks_the_key(sae_dir, server):
    args = ["interpret", str(sae_dir), "--interpreter", "openai", "--base-url", server.base_url, "--sample", "3",
            "--concurrency", "2", "--json", "--price-input", "0.5", "--price-output", "1.5"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["summary"]["features_scored"] == 3 and printed["usage"]["requests"] == 6
    assert "3 of 3 features" in result.stderr and "detection accuracy 1.00" in result.stderr
    assert all(entry["authorization"] == f"Bearer {SECRET}" for entry in server.log), "the key was sent"
    for path in sae_dir.iterdir():
        assert SECRET not in path.read_text()
    assert SECRET not in result.output + result.stderr


def test_credentials_in_the_endpoint_url_are_never_written(sae_dir, server):
    url = server.base_url.replace("http://", "http://alice:pa55word@") + "#token=abc"
    run(sae_dir, server, base_url=url, sample=1)
    written = (sae_dir / "interpretations.json").read_text()
    assert read(sae_dir)["interpreter"]["base_url"] == server.base_url + "/"
    assert "pa55word" not in written and "alice" not in written and "token=abc" not in written


def test_cli_budget_exit_and_errors(sae_dir, server, monkeypatch):
    base = ["interpret", str(sae_dir), "--interpreter", "openai", "--base-url", server.base_url]
    budget = CliRunner().invoke(make_cli(), [*base, "--max-cost", "2", "--price-input", "1000", "--price-output", "1000"])
    assert budget.exit_code == 3 and "budget reached" in budget.stderr and "Run the same command again" in budget.stderr
    foreign = CliRunner().invoke(make_cli(), ["interpret", str(sae_dir), "--base-url", "http://x"])
    assert foreign.exit_code == 2 and "--base-url: not an option of the local interpreter" in foreign.stderr
    monkeypatch.delenv("OPENAI_API_KEY")
    no_key = CliRunner().invoke(make_cli(), base)
    assert no_key.exit_code == 2 and "OPENAI_API_KEY environment variable" in no_key.stderr
    missing = CliRunner().invoke(make_cli(), ["interpret", str(sae_dir.parent)])
    assert missing.exit_code == 2 and "run `routesae contexts" in missing.stderr


def azure_args(sae_dir, azure, *extra):
    return ["interpret", str(sae_dir), "--interpreter", "azure", "--azure-endpoint", azure.endpoint,
            "--api-version", azure.api_version, "--deployment", azure.deployment, "--backoff", "0.01", "--max-backoff", "0.05",
            "--concurrency", "1", *extra]


def test_azure_interprets_through_the_cli_with_retries_budget_and_resume(sae_dir, azure):
    """The reference's backend: the real AzureOpenAI client, a 429 retried, the cost cap, then resume; no key leaks."""
    azure.script(Reply(429, headers={"Retry-After": "0"}))
    prices = ["--price-input", "1000", "--price-output", "1000"]  # about a dollar a request
    capped = CliRunner().invoke(make_cli(), azure_args(sae_dir, azure, "--sample", "4", *prices, "--max-cost", "3"))
    assert capped.exit_code == 3, capped.output
    assert "budget reached" in capped.stderr and "Run the same command again" in capped.stderr
    stopped = read(sae_dir)
    assert 0 < stopped["usage"]["requests"] < 8 and 0 < stopped["usage"]["cost_usd"] <= 3.0
    assert [e["status"] for e in azure.log[:2]] == [429, 200], "the 429 was retried"
    finished = {k for k, r in stopped["latents"].items() if r["detection"] is not None}
    asked = len(azure.log)
    done = CliRunner().invoke(make_cli(), azure_args(sae_dir, azure, "--sample", "4", *prices, "--json"))
    assert done.exit_code == 0, done.output
    doc = read(sae_dir)
    assert json.loads(done.stdout)["summary"] == doc["summary"] and doc["complete"] is True
    assert doc["summary"]["features_scored"] == 4 and doc["summary"]["detection_accuracy"] == 1.0
    assert not {str(i) for i in latents_asked(azure, asked)} & finished, "finished latents are not asked again"
    assert doc["usage"]["requests"] == len(azure.log) - 1 == 8, "every answered request counted, the 429 not"
    assert doc["interpreter"]["name"] == "azure" and doc["interpreter"]["model"] == azure.deployment
    assert doc["interpreter"]["azure_endpoint"] == azure.endpoint and doc["interpreter"]["api_version"] == azure.api_version
    assert {e["path"] for e in azure.log} == {f"/openai/deployments/{azure.deployment}/chat/completions?api-version={azure.api_version}"}
    assert all(e["api_key"] == azure.key and e["authorization"] is None for e in azure.log)
    for path in sae_dir.iterdir():
        assert azure.key not in path.read_text()
    assert azure.key not in capped.output + capped.stderr + done.output + done.stderr


def test_azure_a_changed_deployment_is_not_resumed(sae_dir, azure):
    assert CliRunner().invoke(make_cli(), azure_args(sae_dir, azure, "--sample", "1")).exit_code == 0
    other = [a if a != azure.deployment else "another" for a in azure_args(sae_dir, azure, "--sample", "1")]
    result = CliRunner().invoke(make_cli(), other)
    assert result.exit_code == 2 and f"interpreter model: {azure.deployment!r} then, 'another' now" in result.stderr


def test_azure_cli_errors_are_one_line_with_exit_code_2(sae_dir, azure, monkeypatch):
    def invoke(*args):
        result = CliRunner().invoke(make_cli(), ["interpret", str(sae_dir), "--interpreter", "azure", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    assert "needs --azure-endpoint, --api-version, --deployment" in invoke()
    assert "needs --deployment" in invoke("--azure-endpoint", azure.endpoint, "--api-version", azure.api_version)
    assert "must be an http(s) URL" in invoke("--azure-endpoint", "example.openai.azure.com", "--api-version", "v",
                                               "--deployment", "d")
    assert "--base-url: not an option of the azure interpreter" in invoke("--base-url", "http://x")
    assert "--model: not an option of the azure interpreter" in invoke("--model", "gpt-4o")
    monkeypatch.delenv("AZURE_OPENAI_API_KEY")
    assert "AZURE_OPENAI_API_KEY environment variable" in invoke(*azure_args(sae_dir, azure)[4:])
    assert azure.log == [] and not (sae_dir / "interpretations.json").exists()


class Canned(Interpreter):
    """A third-party backend: always the same answers, one token each, a cent per request."""

    name = "canned"
    concurrency = 2
    max_concurrency = None

    def complete(self, messages, *, max_tokens, temperature):
        text = "Activating: none" if "Activating:" in messages[-1]["content"] else (
            "Feature category: Undiscernible\nScore: 2\nExplanation: nothing in common")
        return Completion(text, 1, 1, 0.01)

    def cost(self, prompt_tokens, completion_tokens):
        return 0.01


class CannedPlugin:
    @hookimpl
    def register_interpreters(self, register):
        register(Canned)


def test_a_plugin_interpreter_is_usable_by_name(sae_dir):
    pm = get_plugin_manager()
    pm.register(CannedPlugin(), name="canned-plugin", distribution="routesae-canned")
    try:
        doc = interpret(sae_dir, "canned", sample=2, progress=False)
        assert doc["interpreter"] == {"name": "canned"} and doc["summary"]["categories"]["undiscernible"]["count"] == 2
        assert doc["summary"]["average_score"] == 2.0 and doc["summary"]["detection_accuracy"] == 0.5
        assert doc["usage"] == {"requests": 4, "prompt_tokens": 4, "completion_tokens": 4, "cost_usd": pytest.approx(0.04)}
        result = CliRunner().invoke(make_cli(pm), ["interpret", str(sae_dir), "--interpreter", "canned", "--overwrite",
                                                   "--sample", "1", "--no-detection", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["usage"]["requests"] == 1
        assert read(sae_dir)["settings"]["detection"] is False
    finally:
        pm.unregister("canned-plugin")
    with pytest.raises(RouteSAEError, match="unknown interpreter 'canned'"):
        interpret(sae_dir, "canned", progress=False)


def test_interpreter_instances_and_options_are_checked(sae_dir):
    with pytest.raises(ConfigError, match="unknown setting.*base_url"):
        interpret(sae_dir, "local", base_url="http://x", progress=False)
    with pytest.raises(ConfigError, match="cannot be applied to an interpreter instance"):
        interpret(sae_dir, Canned(InterpreterConfig()), model="x", progress=False)
    doc = interpret(sae_dir, Canned(), sample=1, detection=False, progress=False)
    assert doc["summary"]["features_scored"] == 1


class InterruptedOnSecondRequest(Canned):
    """Ctrl-C during the second request."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def complete(self, messages, *, max_tokens, temperature):
        self.calls += 1
        if self.calls == 2:  # Ctrl-C reaches the main thread while this request is in flight
            # A real signal, which wakes the main thread where it waits: _thread.interrupt_main() only flags it (and
            # does nothing under SIG_IGN/SIG_DFL); with it, this test failed in full runs for a cause not pinned down.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.3)
        return super().complete(messages, max_tokens=max_tokens, temperature=temperature)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, whatever an earlier test or library may have left there (under
    SIG_IGN the simulated Ctrl-C would be lost, under SIG_DFL it would end the test run)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_starts_no_queued_request_and_keeps_finished_latents(sae_dir, python_sigint):
    backend = InterruptedOnSecondRequest()
    with pytest.raises(KeyboardInterrupt):
        interpret(sae_dir, backend, sample=5, detection=False, concurrency=1, progress=False)
    assert backend.calls == 2, "the three queued latents were not started"
    kept = read(sae_dir)
    assert set(kept["latents"]) <= {str(kept["sampled"][0])}, "at most the answer before the interrupt was written"
    assert kept["summary"]["features_scored"] == len(kept["latents"]) and kept["complete"] is False
    finished = interpret(sae_dir, Canned(), sample=5, detection=False, progress=False)
    assert finished["summary"]["features_scored"] == 5 and finished["complete"] is True


def test_local_interpreter_on_real_contexts_of_a_trained_sae(tiny_model_dir, text_corpus_dir, tmp_path):
    """The whole chain on real files: train a tiny SAE, extract its contexts, interpret with a tiny chat model.
    Its answers are gibberish, which the protocol must record as unparsable, not as scores."""
    from routesae import SAESpec, TrainConfig, train
    from routesae.contexts import extract_contexts

    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=512, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, device="cpu")
    summary = train([SAESpec.build("topk", k=4, latent_size=64, layer=2)], tmp_path / "run", cfg, reporters=[])
    sae_dir = summary["saes"][0]["path"]
    extract_contexts(sae_dir, threshold=0.0, window=8, top_per_class=1, max_classes=2, min_contexts=1, held_out=1,
                     pool=8)
    short = tmp_path / "short.txt"  # the tiny model reads 512 tokens; the built-in prompt alone is longer
    short.write_text("Describe this feature.\n$contexts\nFeature category:\nScore:\nExplanation:")
    doc = interpret(sae_dir, "local", model=str(tiny_model_dir), sample=2, max_tokens=8, prompt_template=short,
                    progress=False)
    assert len(doc["sampled"]) == 2 and doc["interpreter"]["model"] == str(tiny_model_dir)
    for record in doc["latents"].values():
        assert (record["status"], record["score"], record["detection"]) == ("unparsable", None, None)
        assert 0 < record["usage"]["completion_tokens"] <= 8 and record["answer"] is not None
    assert doc["summary"]["features_scored"] == 0 and doc["summary"]["average_score"] is None
    assert doc["usage"]["cost_usd"] == 0.0


@pytest.mark.embedded
def test_the_embedded_smollm2_interprets_offline(sae_dir, embedded_home, monkeypatch):
    """The default backend end to end: SmolLM2-135M-Instruct with the built-in prompts, greedy, offline."""
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    doc = interpret(sae_dir, sample=1, detection=False, max_tokens=32, progress=False)
    assert doc["interpreter"]["model"] == "smollm2" and "model_path" not in doc["interpreter"]
    for record in doc["latents"].values():
        assert record["status"] in ("done", "unparsable") and record["answer"]
        assert record["usage"]["prompt_tokens"] > 300 and record["usage"]["cost_usd"] == 0.0
    summary = doc["summary"]
    assert summary["features_scored"] + summary["unparsable"] == 1 and doc["usage"]["cost_usd"] == 0.0


@pytest.mark.embedded
def test_smollm2_answers_are_prefilled_on_real_contexts(embedded_home, tmp_path, monkeypatch):
    """SmolLM2-135M on a real contexts.json (a latent of the demo's top-k SAE): the answer starts at the format's
    first label and is given once (generation stops where the model would start it over). Whether it then reads
    is not asserted: with the built-in prompt this model still often skips the Score line."""
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    sae_dir = tmp_path / "topk-L21-k32-F4096"
    sae_dir.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "smollm2-topk-contexts.json", sae_dir / "contexts.json")
    doc = interpret(sae_dir, sample=1, detection=False, max_tokens=48, progress=False)
    (record,) = doc["latents"].values()
    assert doc["interpreter"]["prefill"] is True and record["status"] in ("done", "unparsable")
    assert record["answer"].startswith("Feature category:") and record["answer"].count("Feature category:") == 1
