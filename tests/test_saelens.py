"""SAELens's format both ways, without sae-lens: the golden directories real sae-lens wrote
(``tests/data/saelens``, with the outputs it gave), the torch re-implementation of its formulas
(``saelens_formulas.py``, itself checked against those outputs), exact round trips, and every refusal.
``make interop`` runs the same round trips with the real sae-lens."""

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from random_saes import random_sae
from saelens_formulas import saelens_encode_decode
from safetensors.torch import load_file, save_file

from routesae import export_sae, load_sae
from routesae.architectures.base import standardize
from routesae.checkpoint import save_sae
from routesae.cli import make_cli
from routesae.errors import RouteSAEError
from routesae.interop.saelens import LOCAL_KEYS
from routesae.plugins import get_plugin_manager

GOLDENS = Path(__file__).parent / "data" / "saelens"
EXACT = ["standard", "standard-layer-norm", "topk", "jumprelu", "gated"]  # routesae keeps every tensor as is
FOLDED = ["standard-no-input-bias", "gated-no-input-bias"]  # b_dec W_enc folded into the encoder bias
ROUTESAE_ARCH = {"standard": "vanilla", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# (architecture, settings) that SAELens can hold: every exportable built-in (BatchTopK's: tests/test_batchtopk.py)
EXPORTABLE = [("vanilla", {}), ("topk", {"k": 6, "relu": True}), ("jumprelu", {}), ("gated", {})]
META = {
    "name": "test-sae",
    "model": {"spec": "tiny", "path": "/models/tiny", "hub_name": None, "embedded": False, "d_model": 64, "n_layers": 4},
    "hooks": ["blocks.2.hook_resid_post"],
    "hf_hidden_states_index": [3],
    "data": {"source": "corpus", "text_field": "text", "context_length": 32, "has_bos": True, "keep_bos": False},
    "training": {"seed": 42, "tokens_done": 640},
}


def reference(name):
    return load_file(GOLDENS / "reference" / f"{name}.safetensors")


def run(sae, acts_ND):
    """(latents, x_hat in the residual stream) of an SAE on ``acts_ND``."""
    with torch.no_grad():
        out = sae(acts_ND[:, None])
        ((_, (x_hat_ND, _)),) = sae.reconstruction(out).items()
    return out.latents, x_hat_ND


def assert_equal_reconstructions(ours_ND, theirs_ND, acts_ND):
    """The issue's rule: max abs difference <= 1e-5 x the activation's norm, token by token."""
    excess = (ours_ND - theirs_ND).abs() - 1e-5 * acts_ND.norm(dim=-1, keepdim=True)
    assert (excess <= 0).all(), f"exceeds the tolerance by up to {excess.max().item():.3g}"


def activations(d, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * (0.5 + 3 * torch.rand(n, 1, generator=g)) + torch.rand(n, 1, generator=g)


def saved(sae, directory):
    save_sae(sae, directory, {**META, "model": {**META["model"], "d_model": sae.d_model}})
    return directory


def assert_same_checkpoint(a_dir, b_dir):
    """Same weights bit for bit, same config.json except where it was read from (``LOCAL_KEYS``)."""
    a, a_config = load_sae(a_dir)
    b, b_config = load_sae(b_dir)
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for name in a_state:
        assert torch.equal(a_state[name], b_state[name]), name
    assert travelling(a_config) == travelling(b_config)


def travelling(config):
    """A config.json without what names its own files or where it was read from."""
    return {k: v for k, v in config.items() if k not in LOCAL_KEYS}


def cli(*args):
    return CliRunner().invoke(make_cli(), [str(a) for a in args])


def assert_short_error(result, *named):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    for text in named:
        assert str(text) in result.stderr, (text, result.stderr)


# -- the goldens: what real sae-lens wrote and computed -----------------------------------------------


def test_the_goldens_record_the_sae_lens_that_wrote_them():
    versions = json.loads((GOLDENS / "versions.json").read_text())
    assert versions["sae_lens"].split(".")[0] == "6"
    for name in EXACT + FOLDED:
        cfg = json.loads((GOLDENS / name / "cfg.json").read_text())
        assert cfg["metadata"]["sae_lens_version"] == versions["sae_lens"]


@pytest.mark.parametrize("name", EXACT + FOLDED)
def test_the_formulas_are_what_sae_lens_computed(name):
    ref = reference(name)
    z, out = saelens_encode_decode(GOLDENS / name, ref["acts"])
    assert torch.allclose(z, ref["feature_acts"], atol=1e-5) and (z != 0).any()
    assert_equal_reconstructions(out, ref["sae_out"], ref["acts"])


@pytest.mark.parametrize("name", EXACT + FOLDED)
def test_an_imported_golden_computes_what_sae_lens_computed(name):
    ref = reference(name)
    sae, config = load_sae(GOLDENS / name)
    latents, x_hat = run(sae, ref["acts"])
    assert_equal_reconstructions(x_hat, ref["sae_out"], ref["acts"])
    assert torch.allclose(latents, ref["feature_acts"], atol=1e-5)
    assert ((latents != 0) == (ref["feature_acts"] != 0)).all(), "the same latents fire"
    if name in EXACT and name != "gated":  # gated multiplies W_enc by exp(r_mag) before the matmul, routesae after
        assert torch.equal(x_hat, ref["sae_out"]), "the same operations give the same bits"
    assert ("folded" in config["source"]) == (name in FOLDED)


def test_an_imported_golden_config_says_what_cfg_json_says():
    _, topk = load_sae(GOLDENS / "topk")
    assert (topk["architecture"], topk["d_model"], topk["layers"]) == ("topk", 64, [2])
    assert {k: topk["config"][k] for k in ("latent_size", "k", "relu", "normalize", "layer")} == {
        "latent_size": 64, "k": 8, "relu": True, "normalize": "none", "layer": 2}
    assert topk["model"] == {"spec": "tiny-llama", "d_model": 64, "hook": "blocks.{layer}.hook_resid_post",
                             "known_by_name": True}
    assert topk["data"] == {"source": "corpus", "text_field": "text", "context_length": 32, "has_bos": True,
                            "keep_bos": False}
    assert topk["hooks"] == ["blocks.2.hook_resid_post"] and topk["hf_hidden_states_index"] == [3]
    assert topk["source"]["format"] == "saelens" and topk["source"]["sae_lens_version"] == "6.54.12"
    _, jumprelu = load_sae(GOLDENS / "jumprelu")
    assert jumprelu["layers"] == [2], "blocks.3.hook_resid_pre is block 2's output"
    _, layer_norm = load_sae(GOLDENS / "standard-layer-norm")
    assert (layer_norm["architecture"], layer_norm["config"]["normalize"]) == ("vanilla", "layer_norm")


@pytest.mark.parametrize("name", EXACT)
def test_a_golden_exported_again_is_the_golden(name, tmp_path):
    export_sae(GOLDENS / name, tmp_path / "again")
    theirs, ours = load_file(GOLDENS / name / "sae_weights.safetensors"), load_file(tmp_path / "again" / "sae_weights.safetensors")
    assert theirs.keys() == ours.keys()
    for key in theirs:
        if key == "threshold":
            # routesae holds log θ: exp(log θ) gives θ back to within float32 rounding, not always bit for bit
            assert torch.allclose(ours[key], theirs[key], rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        else:
            assert torch.equal(ours[key], theirs[key]), key
    cfg = json.loads((GOLDENS / name / "cfg.json").read_text())
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert again["metadata"].pop("routesae")["architecture"] == ROUTESAE_ARCH[cfg["architecture"]]
    assert again == cfg


# -- routesae -> SAELens -> routesae -----------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
@pytest.mark.parametrize(("arch", "settings"), EXPORTABLE, ids=[a for a, _ in EXPORTABLE])
def test_an_export_computes_in_saelens_what_it_computes_here_and_comes_back_exact(arch, settings, normalize, tmp_path):
    sae = random_sae(arch, settings, normalize)
    source = saved(sae, tmp_path / "sae")
    files = export_sae(source, tmp_path / "saelens")
    assert {f.name for f in files} >= {"cfg.json", "sae_weights.safetensors"}
    acts = activations(sae.d_model)
    latents, x_hat = run(sae, acts)
    z, out = saelens_encode_decode(tmp_path / "saelens", acts)
    assert_equal_reconstructions(x_hat, out, acts)
    assert torch.allclose(latents, z, atol=1e-5) and (latents != 0).any()
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (64, 96, "float32", "cpu")
    assert cfg["normalize_activations"] == normalize
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert (cfg["metadata"]["model_name"], cfg["metadata"]["context_size"], cfg["metadata"]["dataset_path"]) == (
        "tiny", 32, "corpus")
    assert (cfg["metadata"]["prepend_bos"], cfg["metadata"]["seqpos_slice"]) == (True, [1, None]), "position 0 dropped"
    assert_same_checkpoint(source, tmp_path / "saelens")


@settings(max_examples=25, deadline=None)
@given(
    choice=st.sampled_from(EXPORTABLE),
    normalize=st.sampled_from(["none", "layer_norm"]),
    d=st.integers(2, 24),
    latent_size=st.integers(8, 40),
    seed=st.integers(0, 2**16),
)
def test_any_exportable_sae_comes_back_bit_for_bit(choice, normalize, d, latent_size, seed):
    arch, settings_ = choice
    sae = random_sae(arch, settings_, normalize, d=d, latent_size=latent_size, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        source = saved(sae, Path(tmp) / "sae")
        export_sae(source, Path(tmp) / "saelens")
        assert_same_checkpoint(source, Path(tmp) / "saelens")
        export_sae(Path(tmp) / "saelens", Path(tmp) / "again")  # and SAELens -> routesae -> SAELens
        for name in ("cfg.json", "sae_weights.safetensors"):
            assert (Path(tmp) / "saelens" / name).read_bytes() == (Path(tmp) / "again" / name).read_bytes()


def test_jumprelu_gets_its_log_threshold_back_only_while_it_gives_the_threshold(tmp_path):
    sae = random_sae("jumprelu", {})
    export_sae(saved(sae, tmp_path / "sae"), tmp_path / "saelens")
    weights = load_file(tmp_path / "saelens" / "sae_weights.safetensors")
    assert torch.equal(weights["threshold"], sae.log_threshold.detach().exp())
    assert torch.equal(load_sae(tmp_path / "saelens")[0].log_threshold, sae.log_threshold)
    weights["threshold"] = weights["threshold"] * 1.5  # edited in SAELens since: the saved log θ is no longer its log
    save_file(weights, tmp_path / "saelens" / "sae_weights.safetensors")
    edited = load_sae(tmp_path / "saelens")[0]
    assert torch.allclose(edited.log_threshold.exp(), weights["threshold"], rtol=1e-6)


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "settings", "normalize", "named"),
    [
        ("topk", {"k": 6}, "none", ["relu=False", "--relu"]),
        ("topk", {"k": 6}, "token", ["normalize='token'", "; and ", "relu=False"]),  # the defaults: both reasons at once
        ("vanilla", {}, "token", ["normalize='token'", "1e-6", "1e-5", "--normalize layer_norm"]),
        ("routesae", {"layers": "1:3", "k": 6}, "token", ["SAELens cannot host a routed", "routesae-parts"]),
        ("crosscoder", {"layers": "1:3"}, "none", ["SAELens cannot host", "blocks 1..3"]),
        ("mlsae", {"layers": "1:3", "k": 6, "relu": True}, "none", ["SAELens cannot host", "blocks 1..3"]),
    ],
)
def test_what_saelens_cannot_hold_exactly_is_refused_and_nothing_is_written(arch, settings, normalize, named, tmp_path):
    cls = get_plugin_manager().get("architecture", arch)
    config = cls.build_config({"latent_size": 32, "normalize": normalize, **settings}).resolve(4)
    sae_dir = saved(cls(config, 64), tmp_path / "sae")
    result = cli("export", sae_dir, "--format", "saelens", "--out", tmp_path / "out")
    assert_short_error(result, *named)
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_out_that_is_not_empty(tmp_path):
    sae_dir = saved(random_sae("vanilla", {}), tmp_path / "sae")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    assert_short_error(cli("export", sae_dir, "--format", "saelens", "--out", tmp_path / "out"), "not empty", "mine.txt")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert cli("export", sae_dir, "--format", "nonsense", "--out", tmp_path / "x").exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("export", sae_dir, "--format", "saelens", "--out", empty, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["cfg.json", "sae_weights.safetensors"]


def _edited_golden(tmp_path, name="standard", **changes):
    directory = tmp_path / name
    shutil.copytree(GOLDENS / name, directory)
    cfg = json.loads((directory / "cfg.json").read_text())
    for key, value in changes.items():
        target = cfg["metadata"] if key in ("hook_name", "hook_head_index", "sae_lens_version") else cfg
        target[key] = value
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda t: GOLDENS / "abstopk", ["'abstopk' has no routesae equivalent", "supported: gated, jumprelu, standard, topk"]),
        (lambda t: GOLDENS / "topk-rescaled", ["rescale_acts_by_decoder_norm"]),
        (lambda t: _edited_golden(t, normalize_activations="expected_average_only_in"), ["expected_average_only_in", "fold"]),
        (lambda t: _edited_golden(t, reshape_activations="hook_z"), ["hook_z"]),
        (lambda t: _edited_golden(t, hook_name="blocks.2.hook_mlp_out"), ["blocks.2.hook_mlp_out", "hook_resid_post"]),
        (lambda t: _edited_golden(t, hook_name="blocks.0.hook_resid_pre"), ["blocks.0.hook_resid_pre"]),
        (lambda t: _edited_golden(t, sae_lens_version="5.9.0"), ["sae-lens 6", "save_model"]),
        (lambda t: _edited_golden(t, d_in=32), ["has shape", "do not belong"]),
        (lambda t: _edited_golden(t, dtype="float64"), ["float64"]),
    ],
    ids=["abstopk", "rescaled", "scaling-factor", "hook-z", "mlp-out", "embedding", "sae-lens-5", "shapes", "float64"],
)
def test_a_saelens_directory_routesae_cannot_compute_is_refused_with_the_reason(make, named, tmp_path):
    directory = make(tmp_path)
    with pytest.raises(RouteSAEError) as error:
        load_sae(directory)
    for text in named:
        assert text in str(error.value), (text, str(error.value))
    assert_short_error(cli("export", directory, "--format", "saelens", "--out", tmp_path / "out"), *named)


def test_a_damaged_saelens_directory_is_an_error_not_a_traceback(tmp_path):
    directory = _edited_golden(tmp_path)
    weights = directory / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_short_error(cli("export", directory, "--format", "saelens", "--out", tmp_path / "o1"), "damaged or truncated")
    weights.unlink()
    assert_short_error(cli("export", directory, "--format", "saelens", "--out", tmp_path / "o2"), "incomplete")
    (directory / "cfg.json").write_text("{not json")
    assert_short_error(cli("export", directory, "--format", "saelens", "--out", tmp_path / "o3"), "not valid JSON")


# -- RouteSAE's parts, and SAELens's layer_norm in routesae ------------------------------------------------


def test_a_routesae_exports_its_parts_with_a_readme_that_says_saelens_cannot_host_it(tmp_path):
    cls = get_plugin_manager().get("architecture", "routesae")
    sae = cls(cls.build_config({"layers": "1:3", "latent_size": 32, "k": 4}).resolve(4), 64)
    with torch.no_grad():
        sae.routing_counts.copy_(torch.tensor([5.0, 7.0, 11.0]))
    files = export_sae(saved(sae, tmp_path / "sae"), tmp_path / "parts", "routesae-parts")
    assert [f.name for f in files] == ["README.md", "inner", "router.safetensors", "statistics.json"]
    readme = (tmp_path / "parts" / "README.md").read_text()
    assert "SAELens cannot host a routed SAE as a whole" in readme and "blocks 1..3" in readme
    inner, inner_config = load_sae(tmp_path / "parts" / "inner")
    assert inner_config["architecture"] == "topk" and inner_config["inner_of"] == "test-sae"
    assert all(torch.equal(inner.state_dict()[k], v) for k, v in sae.sae.state_dict().items())
    assert torch.equal(load_file(tmp_path / "parts" / "router.safetensors")["router_weight_LD"], sae.router.weight.detach())
    statistics = json.loads((tmp_path / "parts" / "statistics.json").read_text())
    assert statistics["statistics"]["routing_counts"] == {"1": 5.0, "2": 7.0, "3": 11.0}
    assert (statistics["layers"], statistics["router"], statistics["normalize"]) == ([1, 2, 3], "hard", "token")
    result = cli("export", tmp_path / "sae", "--format", "routesae-parts", "--out", tmp_path / "vanilla-parts")
    assert result.exit_code == 0
    vanilla = saved(random_sae("vanilla", {}), tmp_path / "vanilla")
    assert_short_error(cli("export", vanilla, "--format", "routesae-parts", "--out", tmp_path / "v"), "saelens")


def test_layer_norm_is_saelens_standardisation():
    acts = activations(64)
    x, norm = standardize(acts[:, None], "layer_norm")
    centred = acts - acts.mean(-1, keepdim=True)
    std = centred.std(-1, keepdim=True)
    assert torch.equal(x[:, 0], centred / (std + 1e-5))
    assert torch.equal(norm.undo(x)[:, 0], x[:, 0] * std + acts.mean(-1, keepdim=True))
    token, _ = standardize(acts[:, None], "token")
    assert not torch.allclose(token, x, rtol=0, atol=1e-7), "the reference's 1e-6 is another standardisation"
    assert math.isclose(float((token - x).abs().max()), 0, abs_tol=1e-4)
