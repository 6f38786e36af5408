"""``routesae export``: an SAE in another library's format (SAELens), through its architecture's exporter."""

from __future__ import annotations

import click

from routesae.cli.options import command, json_option, print_json, print_written
from routesae.plugins import PluginManager


def make_export_command(pm: PluginManager) -> click.Command:
    from routesae.export import export_formats, export_sae

    def callback(sae_dir: str, export_format: str, out: str, as_json: bool) -> None:
        files = export_sae(sae_dir, out, export_format)
        if as_json:
            print_json({"sae": sae_dir, "format": export_format, "out": out, "files": [f.name for f in files]})
        print_written(f"{sae_dir} as {export_format} ({', '.join(f.name for f in files)})", [out])

    formats = export_formats(pm)
    params: list[click.Parameter] = [
        click.Argument(["sae_dir"], type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--format", "export_format"],
            type=click.Choice(formats),
            required=True,
            help="Format to write, one the installed exporters write: saelens is SAELens 6's directory (cfg.json + "
            "sae_weights.safetensors, what sae_lens.SAE.load_from_disk reads).",
        ),
        click.Option(
            ["--out"], type=click.Path(file_okay=False), required=True, help="Directory to write; must be new or empty."
        ),
        json_option("Print what was written as JSON."),
    ]
    return command(
        "export",
        callback=callback,
        params=params,
        help_text="Write an SAE checkpoint (or a SAELens directory) in another format, exactly or not at all: an SAE the "
        "format cannot hold exactly is refused with the reason.",
        example='routesae export runs/relu/topk-L21-k32-F4096 --format saelens --out exported/topk',
    )
