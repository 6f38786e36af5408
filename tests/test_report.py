"""The HTML report on a real run: a tiny TopK and RouteSAE trained, evaluated and given contexts by the
real stages, plus interpretations written to the schema. The page is checked twice: parsed with
``html.parser`` (structure, numbers, escaping) and loaded in headless Chromium (no errors, no
requests, no injected elements, the live DOM)."""

from __future__ import annotations

import hashlib
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from routesae import SAESpec, TrainConfig, train
from routesae.cli import make_cli
from routesae.contexts import extract_contexts
from routesae.errors import RouteSAEError
from routesae.evaluate import evaluate
from routesae.files import read_json, write_json
from routesae.lm import LanguageModel
from routesae.report import FILTER_SCRIPT, render_report, write_report

XSS_NAME = '"><img src=x onerror=window.__xss=1>&é'  # an SAE name (a directory name too, so no slash)
XSS_SCRIPT = "<script>window.__xss=2</script>"
XSS_ATTR = '"><img src=x onerror=window.__xss=3>'
XSS_TEXT = "a & b < c — café ✓ 日本"
HOSTILE = (XSS_SCRIPT, XSS_ATTR, XSS_TEXT)


# -- a minimal DOM over html.parser ---------------------------------------------------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None = None) -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        return [
            n for n in self.iter()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, cls, **attrs)
        assert found, f"no <{tag} class={cls} {attrs}>"
        return found[0]


class DOM(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {})
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, f"stray </{tag}>"
        self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html: str) -> Node:
    return DOM(html).root


# -- the run ----------------------------------------------------------------------------------------
def interpretations_for(contexts_path: Path) -> dict:
    """An interpretations.json for the schema: scored latents of each category, an unparsable and a failed one."""
    contexts = read_json(contexts_path)
    ids = sorted(map(int, contexts["latents"]))
    assert len(ids) >= 5, "the fixture needs at least five kept latents"
    scored = {ids[0]: ("low-level", 2, XSS_SCRIPT), ids[1]: ("high-level", 5, XSS_ATTR),
              ids[2]: ("undiscernible", 1, XSS_TEXT)}
    latents = {}
    for latent, (category, score, explanation) in scored.items():
        latents[str(latent)] = {
            "status": "done", "category": category, "score": score, "explanation": explanation,
            "answer": f"Category: {category}\nScore: {score}\nExplanation: {explanation}", "error": None,
            "detection": {"accuracy": 0.8, "n": 10, "correct": 8, "status": "done", "answer": "1, 3"},
            "usage": {"prompt_tokens": 500, "completion_tokens": 40, "cost_usd": 0.0001},
        }
    latents[str(ids[3])] = {"status": "unparsable", "category": None, "score": None, "explanation": None,
                            "answer": "I am not sure <b>what</b> this is", "error": None, "detection": None,
                            "usage": {"prompt_tokens": 500, "completion_tokens": 20, "cost_usd": 0.0001}}
    latents[str(ids[4])] = {"status": "error", "category": None, "score": None, "explanation": None, "answer": None,
                            "error": "HTTP 500 after 3 retries", "detection": None, "usage": None}
    return {
        "format": "routesae.interpretations", "format_version": 1, "routesae_version": "0.1.0",
        "sae": contexts["sae"], "contexts_fingerprint": hashlib.sha256(contexts_path.read_bytes()).hexdigest(),
        "interpreter": {"name": "openai", "model": "gpt-4o-mini", "base_url": "http://127.0.0.1:1/v1"},
        "prompt_template": {"name": "builtin", "sha256": "0" * 64},
        "settings": {"sample": 5, "seed": 42, "detection": True},
        "sampled": ids[:5],
        "latents": latents,
        "summary": {
            "features_scored": 3, "unparsable": 1, "errors": 1, "average_score": 8 / 3,
            "categories": {"low-level": {"count": 1, "mean_score": 2.0}, "high-level": {"count": 1, "mean_score": 5.0},
                           "undiscernible": {"count": 1, "mean_score": 1.0}},
            "detection_accuracy": 0.8,
        },
        "usage": {"requests": 8, "prompt_tokens": 2500, "completion_tokens": 180, "cost_usd": 0.0005},
    }


def make_hostile(contexts_path: Path) -> tuple[str, str]:
    """Give the first context of the first kept latent hostile token texts; returns (latent id, marked token)."""
    contexts = read_json(contexts_path)
    latent_id, latent = next(iter(contexts["latents"].items()))
    context = next(iter(latent["classes"].values()))[0]
    context["tokens"] = [XSS_TEXT, " ", XSS_SCRIPT, XSS_ATTR, " end"]
    context["index"] = 2
    context["activation"] = latent["max_activation"] + 1.0  # shown first on its card
    latent["logit_lens"]["promoted"][0]["token"] = XSS_ATTR
    latent["logit_lens"]["suppressed"][0]["token"] = XSS_SCRIPT
    write_json(contexts_path, contexts)
    return latent_id, XSS_SCRIPT


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    """A RouteSAE and a (hostilely named) TopK: trained, evaluated, contexts extracted; interpretations for RouteSAE."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the per-test isolated home is not set up yet
        mp.setenv("ROUTESAE_HOME", str(root / "home"))
        lm = LanguageModel.load(str(tiny_model_dir))
        out = root / "run"
        specs = [SAESpec.build("routesae", k=4, latent_size=64, layers="1:2"),
                 SAESpec.build("topk", name=XSS_NAME, k=4, latent_size=64, layer=2)]
        cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=640, batch_size=4,
                          context_length=32, sae_batch_tokens=64, buffer_tokens=256, device="cpu")
        train(specs, out, cfg, reporters=[], lm=lm)
        evaluate([out], tokens=200, batch_size=4, reporters=[], lm=lm)
        extract_contexts([out], threshold=1.0, min_contexts=2, window=16, held_out=2, pool=10, batch_size=4, lm=lm)
    routesae_dir = out / "routesae-L1-2-hard-sum-k4-F64"
    hostile_latent, hostile_token = make_hostile(routesae_dir / "contexts.json")
    write_json(routesae_dir / "interpretations.json", interpretations_for(routesae_dir / "contexts.json"))
    return {"dir": out, "routesae": routesae_dir, "topk": out / XSS_NAME, "hostile": (hostile_latent, hostile_token)}


@pytest.fixture(scope="module")
def report(run):
    path = write_report(run["dir"])
    return path, parse(path.read_text(encoding="utf-8"))


def sae_section(dom: Node, name: str) -> Node:
    return next(s for s in dom.find_all("section", "sae") if s.attrs["data-sae"] == name)


# -- rendering, without a browser --------------------------------------------------------------------
def test_metric_table_has_one_row_per_sae_with_its_numbers_and_the_best_marked(run, report):
    path, dom = report
    assert path == run["dir"] / "report.html"
    records = {d.name: read_json(d / "eval.json") for d in (run["routesae"], run["topk"])}
    rows = dom.find("table", "metrics").find("tbody").find_all("tr")
    assert sorted(r.attrs["data-sae"] for r in rows) == sorted(records)
    for row in rows:
        metrics = records[row.attrs["data-sae"]]["metrics"]
        cells = {td.attrs["data-metric"]: td for td in row.find_all("td") if "data-metric" in td.attrs}
        assert set(cells) == set(metrics)
        for name, value in metrics.items():
            assert cells[name].text() == f"{value:.4g}"
            others = [r["metrics"][name] for r in records.values()]
            better = records[row.attrs["data-sae"]]["better"][name]
            best = better and value == (min(others) if better == "lower" else max(others))
            assert ("best" in cells[name].classes) == bool(best), (name, value, others)
    headers = {th.attrs["data-metric"]: th.text() for th in dom.find("table", "metrics").find_all("th") if "data-metric" in th.attrs}
    assert "↓" in headers["normmse"] and "↑" in headers["recovered"] and "↑" not in headers["l0"] and "↓" not in headers["l0"]


def test_routing_histogram_has_one_bar_per_routed_block(run, report):
    _, dom = report
    counts = read_json(run["routesae"] / "config.json")["training"]["statistics"]["routing_counts"]
    bars = sae_section(dom, run["routesae"].name).find("svg", "histogram").find_all("rect", "bar")
    assert [b.attrs["data-label"] for b in bars] == list(counts) == ["1", "2"]
    total = sum(counts.values())
    for bar, count in zip(bars, counts.values()):
        assert float(bar.attrs["data-share"]) == pytest.approx(count / total)
        assert f"{count / total:.1%}" in bar.find("title").text()
    assert not sae_section(dom, XSS_NAME).find_all("svg", "histogram")  # a TopK has no routing


def test_cards_show_interpreted_latents_by_score_then_others_with_marked_tokens(run, report):
    _, dom = report
    contexts = read_json(run["routesae"] / "contexts.json")
    interpretations = read_json(run["routesae"] / "interpretations.json")
    cards = sae_section(dom, run["routesae"].name).find_all("article", "card")
    interpreted = [c for c in cards if c.attrs["data-interpreted"] == "true"]
    assert [c.attrs["data-latent"] for c in cards[: len(interpreted)]] == [c.attrs["data-latent"] for c in interpreted]
    by_score = sorted(interpretations["latents"].items(), key=lambda kv: (kv[1]["score"] is None, -(kv[1]["score"] or 0), int(kv[0])))
    assert [c.attrs["data-latent"] for c in interpreted] == [k for k, _ in by_score]
    assert [c.find("span", "badge").text() for c in interpreted[:3]] == ["high-level", "low-level", "undiscernible"]
    assert interpreted[0].find("span", "badge").classes == {"badge", "cat-high"}
    assert interpreted[0].find("span", "score").text() == "score 5/5"
    assert "detection 80% of 10" in interpreted[0].text()
    assert interpreted[3].find("span", "badge").text() == "unparsable"
    assert "HTTP 500 after 3 retries" in interpreted[4].find("p", "warning").text()
    others = cards[len(interpreted):]
    assert len(others) == min(24, len(contexts["latents"]) - len(interpretations["latents"]))
    assert all(c.find("span", "badge").text() == "not interpreted" for c in others)
    for card in cards:  # every shown context marks exactly the activating token, with its activation and block
        latent = contexts["latents"][card.attrs["data-latent"]]
        shown = sorted((c for cs in latent["classes"].values() for c in cs), key=lambda c: -c["activation"])[:5]
        items = card.find_all("li", "context")
        assert len(items) == len(shown)
        for item, context in zip(items, shown):
            marks = item.find_all("mark")
            assert [m.text() for m in marks] == [context["tokens"][context["index"]]]
            assert item.find("span", "text").text() == "".join(context["tokens"])
            assert item.find("span", "act").text() == f"{context['activation']:.1f} · block {context['layer']}"


def test_summaries_of_contexts_and_interpretations(run, report):
    _, dom = report
    section = sae_section(dom, run["routesae"].name)
    contexts = read_json(run["routesae"] / "contexts.json")
    assert section.find("strong", "interpretable-latents").text() == str(contexts["interpretable_latents"])
    assert section.find("strong", "threshold").text() == "1.0"
    assert section.find("strong", "average-score").text() == "2.67"
    assert section.find("strong", "detection-accuracy").text() == "80.0%"
    rows = {r.attrs["data-category"]: [td.text() for td in r.find_all("td")] for r in section.find("table", "categories").find_all("tr") if "data-category" in r.attrs}
    assert rows == {"low-level": ["low-level", "1", "2.00"], "high-level": ["high-level", "1", "5.00"],
                    "undiscernible": ["undiscernible", "1", "1.00"]}
    assert "$0.0005" in section.find("div", "interpretations-summary").text()
    topk = sae_section(dom, XSS_NAME)
    note = topk.find("p", "stage-missing", data_stage="interpret")
    assert "not run yet" in note.text() and note.find("code").text() == f"routesae interpret '{run['topk']}'"
    assert topk.find("strong", "interpretable-latents")  # contexts but no interpretations: cards still show


def test_hostile_strings_are_text_never_markup(run, report):
    path, dom = report
    html = path.read_text(encoding="utf-8")
    for hostile in (*HOSTILE, XSS_NAME):
        assert hostile not in html
    scripts = dom.find_all("script")  # the page's one script is its own card filter, allowed by hash; no other
    assert [script.text().strip() for script in scripts] == [FILTER_SCRIPT.strip()] and not dom.find_all("img")
    text = dom.text()
    for hostile in (*HOSTILE, XSS_NAME):
        assert hostile in text
    latent, token = run["hostile"]
    card = sae_section(dom, run["routesae"].name).find("article", "card", data_latent=latent)
    assert card.find("mark").text() == token
    assert dom.find("tr", data_sae=XSS_NAME)  # the name survives intact in attributes too


def test_missing_stages_are_notes_with_the_command_to_run(run, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(run["topk"], lone, ignore=shutil.ignore_patterns("*.json"))
    shutil.copy(run["topk"] / "config.json", lone / "config.json")
    dom = parse(write_report(lone).read_text(encoding="utf-8"))
    notes = {n.attrs["data-stage"]: n for n in dom.find_all("p", "stage-missing")}
    assert set(notes) == {"evaluate", "contexts", "interpret"}
    for stage, note in notes.items():
        assert "not run yet" in note.text()
        assert note.find("code").text() == f"routesae {stage} {lone}"
    assert not dom.find_all("table", "metrics") and not dom.find_all("article", "card")
    assert dom.find("dd", id="tokens").text().startswith("640")  # a lone SAE's header comes from its config


def test_damaged_or_foreign_stage_files_are_notes_not_crashes(run, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(run["routesae"], lone)
    (lone / "eval.json").write_text("{ not json")
    write_json(lone / "contexts.json", {"format": "something-else"})
    write_json(lone / "interpretations.json", [1, 2])
    dom = parse(render_report(lone))
    notes = {n.attrs["data-stage"]: n.text() for n in dom.find_all("p", "stage-missing")}
    assert "not valid JSON" in notes["evaluate"]
    assert "is not a routesae contexts file" in notes["contexts"]
    assert "is not a routesae interpretations file" in notes["interpret"]


def test_interpretations_of_an_older_contexts_file_are_flagged(run, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(run["routesae"], lone)
    contexts = read_json(lone / "contexts.json")
    contexts["settings"]["threshold"] = 2.0
    write_json(lone / "contexts.json", contexts)
    stale = parse(render_report(lone)).find("p", "stale")
    assert "earlier contexts.json" in stale.text() and stale.find("code").text() == f"routesae interpret {lone} --overwrite"
    assert not parse(render_report(run["routesae"])).find_all("p", "stale")


def test_max_cards_bounds_only_the_uninterpreted_cards(run):
    interpreted = len(read_json(run["routesae"] / "interpretations.json")["latents"])
    for max_cards in (0, 2):
        dom = parse(render_report(run["dir"], max_cards=max_cards))
        cards = sae_section(dom, run["routesae"].name).find_all("article", "card")
        assert len(cards) == interpreted + max_cards
        assert len(sae_section(dom, XSS_NAME).find_all("article", "card")) == max_cards


def test_a_run_that_was_never_evaluated_says_how_to_evaluate_it(run, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(run["dir"], fresh, ignore=shutil.ignore_patterns("eval.json", "report.html"))
    dom = parse(render_report(fresh))
    note = dom.find("section", id="metrics").find("p", "stage-missing")
    assert note.find("code").text() == f"routesae evaluate {fresh}"


def test_write_is_atomic_and_errors_are_clear(run, tmp_path):
    out = tmp_path / "r.html"
    assert write_report(run["dir"], out, max_cards=1) == out
    before = out.read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RouteSAEError, match="neither a run directory"):
        write_report(tmp_path / "empty", out)
    with pytest.raises(RouteSAEError, match="not a directory"):
        write_report(out, tmp_path / "other.html")
    with pytest.raises(RouteSAEError, match="is a directory"):
        write_report(run["dir"], tmp_path)
    with pytest.raises(RouteSAEError, match="max-cards"):
        write_report(run["dir"], out, max_cards=-1)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "r-latents", "r.html"]  # no temporary files left behind
    assert all(p.name.startswith("sae-") and p.suffix == ".html" for p in (tmp_path / "r-latents").iterdir())


def test_cli_writes_the_report_and_says_where(run, tmp_path):
    out = tmp_path / "sub" / "report.html"
    result = CliRunner().invoke(make_cli(), ["report", str(run["dir"]), "--out", str(out), "--max-cards", "3"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and out.is_file()
    assert len(sae_section(parse(out.read_text(encoding="utf-8")), XSS_NAME).find_all("article", "card")) == 3
    result = CliRunner().invoke(make_cli(), ["report", str(tmp_path / "sub")])
    assert result.exit_code == 2 and "neither a run directory" in result.output


# -- in a real browser -------------------------------------------------------------------------------
def test_browser_harness_sees_errors_requests_and_injections(browser, tmp_path):
    """The checks below mean something only if a broken page fails them."""
    bad = tmp_path / "bad.html"
    bad.write_text("<p>x</p><img src=missing.png onerror=window.__xss=1><script>console.error('boom'); null.x</script>")
    page = browser.open(bad)
    assert any("boom" in e for e in page.errors) and any("exception" in e for e in page.errors)
    assert any(r.endswith("missing.png") for r in page.requests)
    assert page.evaluate("window.__xss") == 1


def test_report_loads_in_chromium_without_errors_or_requests(run, report, browser):
    path, _ = report
    page = browser.open(path)
    assert page.errors == [], page.console
    assert page.requests == [path.resolve().as_uri()]  # self-contained: nothing else is fetched
    assert page.evaluate("document.title") == f"routesae report · {run['dir'].name}"


def test_the_filter_box_hides_the_cards_that_do_not_match_under_the_pages_csp(run, report, browser):
    path, _ = report
    page = browser.open(path)
    count = "document.querySelectorAll('article.card').length"
    shown = "[...document.querySelectorAll('article.card')].filter(c => !c.hidden).length"
    total = page.evaluate(count)
    word = read_json(run["routesae"] / "interpretations.json")["latents"]
    explanation = next(e["explanation"] for e in word.values() if e.get("explanation"))
    typed = "(box => { box.value = %s; box.dispatchEvent(new Event('input')); })(document.getElementById('filter'))"
    page.evaluate(typed % json.dumps(explanation.split()[0]))
    assert 0 < page.evaluate(shown) < total, "the page's own script ran (its CSP hash matches) and filtered"
    page.evaluate(typed % json.dumps("no-card-says-this"))
    assert page.evaluate(shown) == 0
    page.evaluate(typed % json.dumps(""))
    assert page.evaluate(shown) == total and page.errors == []


def test_report_dom_in_chromium(run, report, browser):
    path, _ = report
    page = browser.open(path)
    rows = page.evaluate("""[...document.querySelectorAll('table.metrics tbody tr')].map(tr => ({
        sae: tr.dataset.sae,
        cells: Object.fromEntries([...tr.querySelectorAll('td[data-metric]')].map(td => [td.dataset.metric, td.textContent])),
        best: [...tr.querySelectorAll('td.best')].map(td => td.dataset.metric)}))""")
    assert sorted(r["sae"] for r in rows) == sorted([run["routesae"].name, XSS_NAME])
    for row in rows:
        metrics = read_json(run["dir"] / row["sae"] / "eval.json")["metrics"]
        assert {k: float(v) for k, v in row["cells"].items()} == pytest.approx(metrics, rel=1e-3, abs=1e-12)
    better = read_json(run["dir"] / rows[0]["sae"] / "eval.json")["better"]
    assert sum(len(r["best"]) for r in rows) >= sum(1 for name in rows[0]["cells"] if better[name])
    labels = page.evaluate("[...document.querySelectorAll('svg.histogram rect.bar')].map(r => r.dataset.label)")
    assert labels == ["1", "2"]
    visible = page.evaluate("[...document.querySelectorAll('svg.histogram rect.bar')].map(r => r.getBBox().height > 0)")
    assert all(visible)
    marks = page.evaluate("""[...document.querySelectorAll('article.card li.context')].map(li =>
        li.querySelectorAll('mark').length)""")
    assert marks and all(n == 1 for n in marks)
    badges = page.evaluate("[...document.querySelectorAll('article.card .badge')].map(b => b.textContent)")
    assert {"high-level", "low-level", "undiscernible", "unparsable", "error", "not interpreted"} <= set(badges)
    notes = page.evaluate("[...document.querySelectorAll('p.stage-missing')].map(p => p.dataset.stage)")
    assert notes == ["interpret"]  # only the TopK's interpretations are missing


def test_hostile_strings_inject_nothing_in_chromium(run, report, browser):
    path, _ = report
    page = browser.open(path)
    assert page.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert page.evaluate("[...document.scripts].map(s => s.textContent.trim())") == [FILTER_SCRIPT.strip()]
    assert page.evaluate("window.__xss === undefined")
    text = page.evaluate("document.body.textContent")
    for hostile in (*HOSTILE, XSS_NAME):
        assert hostile in text
    latent, token = run["hostile"]
    assert page.evaluate(f"document.querySelector('#sae-0-latent-{latent} mark').textContent") == token
    assert page.errors == [], page.console


def test_missing_stages_render_in_chromium(run, browser, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(run["topk"], lone, ignore=shutil.ignore_patterns("eval.json", "contexts.json"))
    page = browser.open(write_report(lone))
    notes = page.evaluate("[...document.querySelectorAll('p.stage-missing')].map(p => [p.dataset.stage, p.textContent])")
    assert [stage for stage, _ in notes] == ["evaluate", "contexts", "interpret"]
    assert all("not run yet" in text and "routesae " in text for _, text in notes)
    assert page.errors == []


# -- training curves, steering, the weak judge, single-layer cards --------------------------------------------------
def test_training_curves_steering_and_a_weak_judge(tmp_path, tiny_model_dir, text_corpus_dir, monkeypatch):
    from routesae.steering import record_steering, steer

    monkeypatch.setenv("ROUTESAE_HOME", str(tmp_path / "home"))
    lm = LanguageModel.load(str(tiny_model_dir))
    out = tmp_path / "run"
    specs = [SAESpec.build("routesae", k=4, latent_size=64, layers="1:2"), SAESpec.build("topk", k=4, latent_size=64, layer=2)]
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=640, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, device="cpu", log_every=2)
    train(specs, out, cfg, reporters=[], lm=lm)
    topk = out / "topk-L2-k4-F64"
    extract_contexts([topk], threshold=0.5, min_contexts=2, window=16, held_out=2, pool=10, batch_size=4, lm=lm)
    record_steering(topk, [steer(topk, "The fox", ["3=+5"], lm=lm, max_new_tokens=2, temperature=0, chat=False)])
    weak = interpretations_for(topk / "contexts.json")
    weak["summary"].update(features_scored=1, unparsable=4)
    write_json(topk / "interpretations.json", weak)

    dom = parse(write_report(out).read_text(encoding="utf-8"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if r["event"] == "step"]
    loss = dom.find("figure", "curve", data_term="loss")
    lines = {line.attrs["data-sae"]: line.attrs["points"].split() for line in loss.find_all("polyline")}
    assert set(lines) == {"routesae-L1-2-hard-sum-k4-F64", "topk-L2-k4-F64"}
    assert all(len(points) == len(steps) for points in lines.values()), "one point per log step"
    last = f"{steps[-1]['saes']['topk-L2-k4-F64']['loss']:.4g}"
    assert last in loss.find("ul", "legend").text()
    assert dom.find("figure", "curve", data_term="l0")

    section = sae_section(dom, "topk-L2-k4-F64")
    assert "4 of 5 answers could not be read" in section.find("p", "weak-judge").text()
    row = section.find("table", "steering").find("tbody").find("tr")
    assert "3=+5" in row.text() and "The fox" in row.text()
    assert all("block" not in act.text() for act in section.find_all("span", "act")), "one block: not repeated per context"


# -- latent dashboards: frequency, activation histogram, logit lens; the per-SAE latent pages -------------------------
def test_cards_show_frequency_histogram_and_logit_lens(run, report):
    _, dom = report
    contexts = read_json(run["routesae"] / "contexts.json")
    cards = [c for c in sae_section(dom, run["routesae"].name).find_all("article", "card")
             if c.attrs["data-latent"] in contexts["latents"]]
    assert cards
    for card in cards:
        latent = contexts["latents"][card.attrs["data-latent"]]
        frequency = card.find("span", "frequency")
        assert frequency.text() == f"fires on {100 * latent['frequency']:.3g}% of tokens"
        assert int(frequency.attrs["data-firings"]) == latent["firings"] == sum(latent["histogram"]["counts"])
        svg = card.find("svg", "act-hist")
        assert int(svg.attrs["data-total"]) == latent["firings"] and int(svg.attrs["data-bins"]) == len(latent["histogram"]["counts"])
        assert svg.find("path").attrs["d"].count("M") == sum(1 for c in latent["histogram"]["counts"] if c)
        for kind in ("promoted", "suppressed"):
            shown = [t.text() for t in card.find("div", kind).find_all("code", "tok")]
            assert shown == [t["token"] for t in latent["logit_lens"][kind]]


def test_an_older_contexts_file_without_dashboards_still_renders(run, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(run["topk"], lone)
    contexts = read_json(lone / "contexts.json")
    contexts["format_version"] = 1
    for key in ("counted_tokens", "logit_lens"):
        del contexts[key]
    for latent in contexts["latents"].values():
        for key in ("firings", "frequency", "histogram", "logit_lens"):
            del latent[key]
    write_json(lone / "contexts.json", contexts)
    dom = parse(write_report(lone).read_text(encoding="utf-8"))
    cards = dom.find_all("article", "card")
    assert cards and all(card.find_all("li", "context") for card in cards)
    assert not dom.find_all("div", "dash") and not dom.find_all("svg", "act-hist")
    assert dom.find("p", "latent-pages"), "the latent pages exist for an older file too"


def test_dashboards_and_latent_pages_in_chromium(run, report, browser):
    path, _ = report
    contexts = read_json(run["routesae"] / "contexts.json")
    page = browser.open(path)
    latent = next(i for i in contexts["latents"] if page.evaluate(f"!!document.querySelector('#sae-0-latent-{i}')"))
    card = f"document.querySelector('#sae-0-latent-{latent}')"
    record = contexts["latents"][latent]
    for kind in ("promoted", "suppressed"):
        tokens = page.evaluate(f"[...{card}.querySelectorAll('.lens.{kind} code.tok')].map(t => t.textContent)")
        assert tokens == [t["token"] for t in record["logit_lens"][kind]]
    assert page.evaluate(f"{card}.querySelector('.frequency').textContent") == f"fires on {100 * record['frequency']:.3g}% of tokens"
    box = page.evaluate(f"(b => [b.width, b.height])({card}.querySelector('svg.act-hist path').getBBox())")
    assert box[0] > 0 and box[1] > 0, "the histogram's bars are drawn"
    assert page.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
    links = page.evaluate("[...document.querySelectorAll('#sae-0 p.latent-pages a')].map(a => a.href)")
    assert links, "the report links to the SAE's latent pages"
    latent_page = browser.open(links[0])
    assert latent_page.errors == [], latent_page.console
    assert latent_page.requests == [links[0]], "a latent page fetches nothing but itself"
    assert latent_page.evaluate("window.__xss === undefined")
    assert latent_page.evaluate("[...document.scripts].map(s => s.textContent.trim())") == [FILTER_SCRIPT.strip()]
    ids = latent_page.evaluate("[...document.querySelectorAll('article.card')].map(c => c.dataset.latent)")
    every = sorted({*contexts["latents"], *read_json(run["routesae"] / "interpretations.json")["latents"]}, key=int)
    assert ids == every[: len(ids)] and len(ids) == min(len(every), 256)
    tokens = latent_page.evaluate(f"[...document.querySelectorAll('#sae-0-latent-{latent} .lens.promoted code.tok')].map(t => t.textContent)")
    assert tokens == [t["token"] for t in record["logit_lens"]["promoted"]]
    back = latent_page.evaluate("document.querySelector('a.back').href")
    assert back == path.resolve().as_uri() + "#sae-0"
    hostile, _ = run["hostile"]
    text = latent_page.evaluate(f"document.querySelector('#sae-0-latent-{hostile}').textContent")
    assert XSS_ATTR in text and XSS_SCRIPT in text


def synthetic_contexts(template: dict, latents: int) -> dict:
    """A contexts.json holding ``latents`` kept latents, each as full as the defaults make them: 10 shown contexts of
    64 tokens, 5 held out, 5 negatives, a 32-bin histogram and 10 promoted and suppressed tokens."""
    context = {"tokens": [" word"] * 64, "index": 32, "activation": 3.0, "layer": 2, "document": 7, "position": 40}
    lens = [{"token": f" token{i}", "id": i, "logit": 0.5} for i in range(10)]
    records = {}
    for latent in range(latents):
        records[str(latent)] = {
            "activations": 100, "max_activation": 3.0 + latent / latents,
            "classes": {f"class{c}": [context, context] for c in range(5)}, "held_out": [context] * 5,
            "non_activating": [0, 1, 2, 3, 4], "firings": 400, "frequency": 0.004,
            "histogram": {"bin_width": 0.125, "counts": list(range(1, 33))},
            "logit_lens": {"promoted": lens, "suppressed": lens},
        }
    return {**template, "latent_size": latents, "interpretable_latents": latents, "latents": records}


def test_a_4096_latent_sae_keeps_every_page_small(run, tmp_path):
    lone = tmp_path / "wide"
    shutil.copytree(run["topk"], lone, ignore=shutil.ignore_patterns("interpretations.json", "report*"))
    write_json(lone / "contexts.json", synthetic_contexts(read_json(run["topk"] / "contexts.json"), 4096))
    path = write_report(lone)
    pages = sorted((lone / "report-latents").iterdir())
    sizes = {p.name: p.stat().st_size for p in [path, *pages]}
    assert path.stat().st_size < 300_000, sizes  # 117 kB measured: the inline cards only
    assert len(pages) == 4096 // 256 and max(sizes.values()) < 1_500_000, sizes  # 1.15 MB each (all 4,096: 18 MB)
    cards = sum(len(parse(p.read_text(encoding="utf-8")).find_all("article", "card")) for p in pages)
    assert cards == 4096
    dom = parse(path.read_text(encoding="utf-8"))
    assert len(dom.find_all("article", "card")) == 24 and len(dom.find("p", "latent-pages").find_all("a")) == 16
    write_json(lone / "contexts.json", synthetic_contexts(read_json(run["topk"] / "contexts.json"), 300))
    write_report(lone)
    assert len(list((lone / "report-latents").iterdir())) == 2, "pages an earlier report wrote and this one does not go"
