"""Checkpoints: atomic safetensors + JSON, rebuilt from config.json alone, with clear errors."""

import json

import pytest
import torch

import routesae
from routesae.architectures.topk import TopKConfig, TopKSAE
from routesae.checkpoint import FORMAT_VERSION, load_sae, save_sae
from routesae.errors import RouteSAEError
from routesae.rundir import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(k=4, latent_size=32, layer=3), 16)
    save_sae(sae, tmp_path / "sae", {"note": "kept"})
    return sae, tmp_path / "sae"


def rewrite_config(directory, change):
    """Edit a saved config.json in place, as a user or a bug might."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    change(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return config


def test_round_trip_needs_nothing_but_the_directory(saved):
    sae, directory = saved
    loaded = routesae.load(directory)
    config = loaded.checkpoint
    assert isinstance(loaded, routesae.SAE) and not loaded.training
    assert load_sae(directory)[1] == config, "load_sae keeps returning the pair"
    assert config["note"] == "kept" and config["architecture"] == "topk" and config["layers"] == [3]
    assert loaded.cfg == sae.cfg and all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values()))
    assert not list(directory.glob(".*.tmp")), "no temporary files are left behind"


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(RouteSAEError, match="holds no SAE checkpoint .*written by `routesae train`"):
        load_sae(tmp_path)


def test_an_unknown_architecture_names_what_is_installed(saved):
    _, directory = saved
    rewrite_config(directory, lambda c: c.update(architecture="mystery"))
    with pytest.raises(RouteSAEError, match="unknown architecture 'mystery'; installed: .*topk"):
        load_sae(directory)


def test_weights_that_do_not_match_the_config_are_refused(saved):
    _, directory = saved
    rewrite_config(directory, lambda c: c["config"].update(latent_size=64))
    with pytest.raises(RouteSAEError, match="does not match its config"):
        load_sae(directory)


def test_missing_weights_and_newer_formats_are_refused(saved):
    _, directory = saved
    rewrite_config(directory, lambda c: c.update(format_version=99))
    with pytest.raises(RouteSAEError, match="newer routesae"):
        load_sae(directory)
    rewrite_config(directory, lambda c: c.update(format_version=FORMAT_VERSION))
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(RouteSAEError, match="incomplete"):
        load_sae(directory)


def test_unknown_config_keys_are_refused_not_dropped(saved):
    _, directory = saved
    rewrite_config(directory, lambda c: c["config"].update(kk=3))
    with pytest.raises(RouteSAEError, match="unknown setting"):
        load_sae(directory)
