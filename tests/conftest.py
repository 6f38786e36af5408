import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from browser import INSTALL_HINT, Browser, find_chromium
from openai_server import FakeAzureOpenAI
from tiny_models import TRAINING_TEXT, make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-block, d_model=64 Llama with a byte-level BPE tokenizer that prepends BOS (pad == EOS)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir_no_bos(tmp_path_factory) -> Path:
    """Like ``tiny_model_dir`` but the tokenizer adds no BOS (as SmolLM2's)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-nobos"), prepend_bos=False)


@pytest.fixture(scope="session")
def text_corpus_dir(tmp_path_factory) -> Path:
    """A folder with a .txt, a .jsonl and a .parquet file of short documents."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    docs = [f"Document {i}. " + TRAINING_TEXT[i % len(TRAINING_TEXT)] * (1 + i % 3) for i in range(60)]
    (root / "a.txt").write_text("\n\n".join(docs[:20]))
    with open(root / "b.jsonl", "w") as f:
        for d in docs[20:40]:
            f.write(json.dumps({"text": d, "other": 1}) + "\n")
    pq.write_table(pa.table({"text": docs[40:]}), root / "c.parquet")
    return root


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own routesae cache, except the embedded model cache, which is shared."""
    shared = os.environ.get("ROUTESAE_TEST_SHARED_HOME")
    monkeypatch.setenv("ROUTESAE_HOME", shared or str(tmp_path / "routesae-home"))


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory) -> Path:
    """One routesae home for every test that uses the real embedded model, so it is converted once.

    ``ROUTESAE_TEST_SHARED_HOME`` (if set) is reused, so a persistent cache can skip conversion.
    Tests must still point ``ROUTESAE_HOME`` here themselves (``_isolated_home`` resets it).
    """
    shared = os.environ.get("ROUTESAE_TEST_SHARED_HOME")
    return Path(shared) if shared else tmp_path_factory.mktemp("routesae-embedded-home")


@pytest.fixture
def azure(monkeypatch):
    """A loopback Azure OpenAI resource (``tests/openai_server.py``), with ``AZURE_OPENAI_API_KEY`` set to its key."""
    server = FakeAzureOpenAI()
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", server.key)
    with server:
        yield server


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the report tests (skipped, with how to install it, where there is none)."""
    if find_chromium() is None:
        pytest.skip(INSTALL_HINT)
    with Browser.start() as b:
        yield b
