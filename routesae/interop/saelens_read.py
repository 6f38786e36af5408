"""A SAELens directory read as a routesae SAE: ``load_sae`` and every stage accept one.

A directory with SAELens's ``cfg.json`` and no routesae ``config.json`` becomes the routesae SAE
that computes the same thing: the registered :class:`~routesae.interop.saelens.SAELensExporter` of
its SAELens architecture maps the fields and tensors. The config it gets is shaped like the
``config.json`` routesae writes, so evaluation, contexts, steering, interpretation and the report
read it as they read their own: its block from ``hook_name``, its model from ``model_name`` (known
by name only: it matches a routesae SAE's model of that name or path), its data from
``dataset_path`` and ``context_size``. A directory that routesae exported carries its whole
``config.json`` in ``metadata.routesae`` and gets it back. ``config["source"]`` says where it came
from, with the ``cfg.json`` as read.

What SAELens can express that routesae does not compute is refused with the reason: another
architecture, a hook other than the residual stream after a block, a normalisation other than
``none``/``layer_norm``, TopK ranking by decoder-norm-scaled values, hook_z reshaping. An SAE whose
encoder does not subtract b_dec (``apply_b_dec_to_input`` false) is accepted with b_dec W_enc
folded into its encoder bias, which is exact only up to float rounding (``source["folded"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from routesae.errors import RouteSAEError, reading
from routesae.files import read_json
from routesae.interop.saelens import (
    EXACT_FILE,
    HOOK_POST,
    METADATA_KEY,
    SAELENS_CONFIG,
    SAELENS_WEIGHTS,
    SAELensExporter,
    hook_layer,
)
from routesae.plugins import get_plugin_manager
from routesae.rundir import CONFIG_FILE
from routesae.version import __version__

#: SAELens's normalize_activations -> routesae's normalize, where routesae computes the same thing.
NORMALIZE = {"none": "none", "layer_norm": "layer_norm"}
UNSUPPORTED_NORMALIZE = {
    "expected_average_only_in": "the SAE expects activations scaled by a factor that cfg.json does not record; "
    "fold it into the weights with sae-lens (sae.fold_activation_norm_scaling_factor(factor), then save_model)",
    "constant_norm_rescale": "routesae has no per-token rescaling to sqrt(d_in)/|x|",
    "covariance_whitening": "the whitening statistics are not in the directory; fold them with sae-lens first",
}
EXACT_DTYPES = ("float32", "torch.float32")
WIDENED_DTYPES = ("float16", "bfloat16", "torch.float16", "torch.bfloat16")  # float32 holds them exactly


def is_saelens_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a SAELens SAE (``cfg.json``) and not a routesae checkpoint (``config.json``)."""
    directory = Path(directory)
    return (directory / SAELENS_CONFIG).is_file() and not (directory / CONFIG_FILE).is_file()


def saelens_exporters() -> list[SAELensExporter]:
    pm = get_plugin_manager()
    exporters = (pm.get("exporter", name) for name in pm.names("exporter"))
    return [e for e in exporters if isinstance(e, SAELensExporter)]


def supported_architectures() -> list[str]:
    return sorted({e.saelens_architecture for e in saelens_exporters() if e.primary})


def exporter_for(cfg: dict[str, Any], wanted: str | None, where: Path) -> SAELensExporter:
    """The exporter that maps ``cfg``'s SAELens architecture: the one for ``wanted`` (the routesae architecture
    routesae exported it from) when registered, else the primary one."""
    architecture = cfg.get("architecture")
    candidates = [e for e in saelens_exporters() if e.saelens_architecture == architecture]
    for exporter in candidates:
        if exporter.architecture == wanted:
            return exporter
    primary = [e for e in candidates if e.primary]
    if not primary:
        raise RouteSAEError(
            f"{where / SAELENS_CONFIG}: SAELens architecture {architecture!r} has no routesae equivalent; "
            f"supported: {', '.join(supported_architectures()) or 'none'}"
        )
    if len(primary) > 1:
        names = " and ".join(repr(e.architecture) for e in primary)
        raise RouteSAEError(f"SAELens architecture {architecture!r} is claimed by two exporters ({names}); uninstall one")
    return primary[0]


def read_saelens_cfg(directory: Path) -> dict[str, Any]:
    """``cfg.json``, with the fields every SAELens SAE has checked."""
    path = Path(directory) / SAELENS_CONFIG
    cfg = read_json(path)
    where = f"{path} is not a SAELens cfg.json"
    if not isinstance(cfg, dict):
        raise RouteSAEError(f"{where} (not a JSON object)")
    metadata = cfg.get("metadata")
    version = str((metadata or {}).get("sae_lens_version") or cfg.get("sae_lens_version") or "")
    major = version.split(".")[0]
    if not isinstance(metadata, dict) or not major.isdigit() or int(major) < 6:
        raise RouteSAEError(
            f"{path} is not in the format of sae-lens 6 (found sae_lens_version {version or 'none'}); load it with "
            "sae-lens 6 and save it again (SAE.load_from_disk(dir).save_model(new_dir))"
        )
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RouteSAEError(f"{where}: {key} must be a positive integer, got {value!r}")
    if not isinstance(cfg.get("architecture"), str):
        raise RouteSAEError(f"{where}: it names no architecture")
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in NORMALIZE:
        reason = UNSUPPORTED_NORMALIZE.get(normalize, "SAELens does not define it")
        raise RouteSAEError(
            f"{path}: normalize_activations {normalize!r} is not supported ({reason}); supported: {', '.join(NORMALIZE)}"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise RouteSAEError(f"{path}: reshape_activations {cfg['reshape_activations']!r} (attention heads) is not supported")
    if metadata.get("hook_head_index") is not None:
        raise RouteSAEError(f"{path}: an SAE of one attention head (hook_head_index) is not supported")
    dtype = cfg.get("dtype", "float32")
    if dtype not in EXACT_DTYPES + WIDENED_DTYPES:
        raise RouteSAEError(f"{path}: dtype {dtype!r} is not supported; routesae SAEs hold float32 (or widen float16/bfloat16)")
    if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
        raise RouteSAEError(f"{where}: apply_b_dec_to_input must be true or false")
    return cfg


def read_saelens_config(directory: Path) -> dict[str, Any]:
    """The routesae ``config.json`` of the SAELens SAE in ``directory`` (see the module docstring)."""
    directory = Path(directory)
    cfg = read_saelens_cfg(directory)
    metadata = cfg["metadata"]
    block = metadata.get(METADATA_KEY) if isinstance(metadata.get(METADATA_KEY), dict) else {}
    exporter = exporter_for(cfg, block.get("architecture"), directory)
    if block.get("architecture") != exporter.architecture:
        block = {}  # written for an architecture not installed here: SAELens's fields alone
    try:
        layer = hook_layer(metadata.get("hook_name"))
        settings = settings_from(cfg, exporter, layer, block)
    except RouteSAEError as e:
        raise RouteSAEError(f"{directory / SAELENS_CONFIG}: {e}") from None
    d_model = cfg["d_in"]
    for key, value in (("d_model", d_model), ("layers", [layer])):
        if key in block and block[key] != value:
            raise RouteSAEError(
                f"{directory / SAELENS_CONFIG} contradicts itself: SAELens's fields give {key} {value}, its routesae "
                f"metadata {block[key]}; restore the file"
            )
    own = {key: value for key, value in block.items() if key not in ("architecture", "config", "d_model", "layers")}
    if not own:  # not written by routesae: what SAELens's metadata says
        own = {
            "name": directory.name,
            "model": {"spec": metadata.get("model_name"), "d_model": d_model, "hook": HOOK_POST, "known_by_name": True},
            "hooks": [HOOK_POST.format(layer=layer)],
            "hf_hidden_states_index": [layer + 1],
            **({"data": data} if (data := data_from(metadata)) else {}),
        }
    source_cfg = {**cfg, "metadata": {k: v for k, v in metadata.items() if k != METADATA_KEY}}
    source: dict[str, Any] = {
        "format": "saelens",
        "directory": str(directory),
        "architecture": cfg["architecture"],
        "sae_lens_version": metadata.get("sae_lens_version"),
        "cfg": source_cfg,
    }
    if not cfg.get("apply_b_dec_to_input", True):
        source["folded"] = "apply_b_dec_to_input is false: b_dec W_enc was added to the encoder bias (exact up to float rounding)"
    if cfg.get("dtype", "float32") not in EXACT_DTYPES:
        source["widened"] = f"{cfg['dtype']} weights, computed in float32"
    return {
        "routesae_version": own.pop("routesae_version", __version__),
        "architecture": exporter.architecture,
        "config": settings,
        "d_model": d_model,
        "layers": [layer],
        **own,
        "source": source,
    }


def settings_from(cfg: dict[str, Any], exporter: SAELensExporter, layer: int, block: dict[str, Any]) -> dict[str, Any]:
    """The routesae architecture's settings: SAELens's fields, then what only routesae's metadata holds (training
    settings), checked to agree; validated and completed by the architecture's own config."""
    settings = {"latent_size": cfg["d_sae"], "layer": layer, "normalize": NORMALIZE[cfg.get("normalize_activations", "none")]}
    settings.update(exporter.settings(cfg))
    for key, value in (block.get("config") or {}).items():
        if key in settings and settings[key] != value:
            raise RouteSAEError(
                f"it contradicts itself: SAELens's fields give {key}={settings[key]!r}, its routesae metadata {value!r}"
            )
        settings.setdefault(key, value)
    arch = get_plugin_manager().get("architecture", exporter.architecture)
    settings, _ = arch.upgrade(settings, {})
    return arch.Config.from_dict(settings).to_dict()


def data_from(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The training data SAELens's metadata names, in config.json's terms (None when it names none)."""
    source, context = metadata.get("dataset_path"), metadata.get("context_size")
    if not isinstance(source, str) or isinstance(context, bool) or not isinstance(context, int):
        return None
    positions = metadata.get("seqpos_slice") or [None]
    return {
        "source": source,
        "text_field": "text",
        "context_length": context,
        "has_bos": bool(metadata.get("prepend_bos", True)),
        "keep_bos": not (isinstance(positions, list) and positions[:1] == [1]),
    }


def read_saelens_weights(directory: Path, config: dict[str, Any]) -> dict[str, Tensor]:
    """routesae's state dict for the SAELens SAE in ``directory``, whose config :func:`read_saelens_config` gave."""
    directory = Path(directory)
    cfg = config["source"]["cfg"]
    exporter = get_plugin_manager().get("exporter", f"saelens:{config['architecture']}")
    tensors = _read_tensors(directory / SAELENS_WEIGHTS)
    if set(tensors) != set(exporter.tensors):
        raise RouteSAEError(
            f"{directory / SAELENS_WEIGHTS} holds {sorted(tensors)}; a SAELens {cfg['architecture']} SAE holds "
            f"{sorted(exporter.tensors)}"
        )
    D, F = cfg["d_in"], cfg["d_sae"]
    expected = {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,)}
    for name, tensor in tensors.items():
        shape = expected.get(name, (F,))
        if tuple(tensor.shape) != shape:
            raise RouteSAEError(
                f"{directory / SAELENS_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, but cfg.json's d_in {D} and "
                f"d_sae {F} make it {shape}; the weights do not belong to this cfg.json"
            )
    tensors = {name: tensor.float() for name, tensor in tensors.items()}
    if not cfg.get("apply_b_dec_to_input", True):
        tensors = exporter.fold_input_bias(tensors)
    exact_path = directory / EXACT_FILE
    exact = _read_tensors(exact_path) if exact_path.is_file() else {}
    return exporter.from_saelens(tensors, exact)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise RouteSAEError(f"{path.parent} has a {SAELENS_CONFIG} but no {path.name}; the SAELens directory is incomplete")
    with reading(str(path), "the file is damaged or truncated; export or download it again"), safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
