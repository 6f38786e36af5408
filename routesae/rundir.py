"""The run directory: its layout, its manifest and its checkpoint generations, in one place.

Every stage reads and writes a run through these names and this class, never by spelling file
names itself::

    RUN/
      run.json                 the manifest: what was asked for, status, progress, the SAEs, the
                               current checkpoint generation, and later stages' records (pipeline)
      metrics.jsonl            the run's append-only record (reporters)
      report.html              the HTML report
      checkpoints/step-NNNNNN/ the current generation: one complete training checkpoint
        rng.safetensors
        SAE/config.json, weights.safetensors, trainer_state.safetensors
      SAE/                     one directory per SAE, what every later stage reads:
        config.json            ``routesae.load``-able checkpoint, published from the current generation
        weights.safetensors
        eval.json, contexts.json, interpretations.json, steering.json

A checkpoint is atomic as a whole: the trainer writes a generation into a temp directory, renames
it into place, publishes its SAE files, and only then points ``run.json`` at it (one atomic
replace). A process killed at any moment leaves ``run.json`` pointing at the last complete
generation, which ``--resume`` restores (and publishes again); generations it does not point at
are leftovers and are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routesae.errors import RouteSAEError
from routesae.files import TEMP_SUFFIX, fsync_directory, read_json, remove_orphans, write_json, write_text

if TYPE_CHECKING:
    from routesae.train_config import RequestChanges

MANIFEST_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.html"
CHECKPOINTS_DIR = "checkpoints"
RNG_FILE = "rng.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TRAINER_STATE_FILE = "trainer_state.safetensors"
EVAL_FILE = "eval.json"
CONTEXTS_FILE = "contexts.json"
INTERPRETATIONS_FILE = "interpretations.json"
STEERING_FILE = "steering.json"

PUBLISHED = (WEIGHTS_FILE, CONFIG_FILE)  # weights before config: a config never names weights not yet there


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an SAE checkpoint directory (it has a ``config.json``)."""
    return (path / CONFIG_FILE).is_file()


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run directory (a ``run.json`` and no SAE ``config.json`` of its own)."""
    return (path / MANIFEST_FILE).is_file() and not is_checkpoint(path)


def expand_dirs(paths: Iterable[Path | str]) -> list[Path]:
    """SAE checkpoint directories; a run directory gives its SAEs, in the order of its manifest."""
    dirs: list[Path] = []
    for path in map(Path, paths):
        if is_run(path):
            dirs.extend(RunDirectory(path).sae_dirs())
        else:
            dirs.append(path)
    if not dirs:
        raise RouteSAEError("nothing to do: give at least one SAE or run directory")
    return dirs


def run_dir_of(sae_dir: Path) -> Path:
    """The run an SAE belongs to (the parent holding ``run.json``), or the SAE directory itself."""
    return sae_dir.parent if (sae_dir.parent / MANIFEST_FILE).is_file() else sae_dir


SAE_NAME_MAX_BYTES = 255  # a file name's limit on common file systems


def check_sae_name(name: str) -> str:
    """An SAE's name is one directory inside the run: one plain path component, nothing hidden, nothing invisible."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", CHECKPOINTS_DIR)
        or name.startswith(".")  # hidden, and the prefix of routesae's own temp and lock files
        or any(c in "/\\" or unicodedata.category(c) == "Cc" for c in name)
        or len(name.encode("utf-8")) > SAE_NAME_MAX_BYTES
    ):
        raise RouteSAEError(
            f"{name!r} cannot name an SAE: the name becomes a directory inside the run, so it must be one plain path "
            f"component (no '/' or '\\', no leading '.', no control characters, at most {SAE_NAME_MAX_BYTES} bytes, "
            f"not {CHECKPOINTS_DIR!r})"
        )
    return name


def inside(root: Path, name: str) -> Path:
    """``root/name`` for an SAE ``name``, checked once resolved (symbolic links followed) to lie directly in ``root``."""
    path = root / check_sae_name(name)
    if path.resolve().parent != root.resolve():
        raise RouteSAEError(f"{path} leads outside {root} (a symbolic link?); routesae writes only inside the run")
    return path


@dataclass(frozen=True)
class Generation:
    """One complete training checkpoint: every SAE's files and the RNG at one step."""

    path: Path

    def sae_dir(self, name: str) -> Path:
        return inside(self.path, name)

    def trainer_state(self, name: str) -> Path:
        return self.sae_dir(name) / TRAINER_STATE_FILE

    @property
    def rng(self) -> Path:
        return self.path / RNG_FILE


class RunDirectory:
    """A run's directory: paths, the manifest, the request check and checkpoint generations."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # -- layout -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def checkpoints_path(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def sae_dir(self, name: str) -> Path:
        return inside(self.path, name)

    def sae_dirs(self) -> list[Path]:
        """The SAE directories the manifest lists (each checked to be a plain name inside the run)."""
        return [self.sae_dir(sae["path"]) for sae in self.read_manifest()["saes"]]

    # -- the manifest -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise RouteSAEError(f"{self.path} holds no run ({MANIFEST_FILE} is missing)")
        return read_json(self.manifest_path)

    def update_manifest(self, sections: dict[str, Any]) -> dict[str, Any]:
        """Replace these top-level sections of ``run.json`` atomically, keeping the others (e.g. ``pipeline``)."""
        manifest = {**(self.read_manifest() if self.exists() else {}), **sections}
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, manifest)
        return manifest

    def start(self, manifest: dict[str, Any]) -> None:
        """Begin a fresh run here: a new ``run.json`` (nothing of an earlier run kept), no metrics log, no generations."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, manifest)
        self.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints_path, ignore_errors=True)

    def rewind_metrics(self, step: int) -> None:
        """Cut ``metrics.jsonl`` back to the checkpoint at ``step``: a resumed run logs the later steps again, once.

        Keeps every record before the first step after ``step`` (and drops a line a kill cut short).
        """
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not line.endswith("\n") or (record.get("event") == "step" and record.get("step", 0) > step):
                break
            kept.append(line)
        write_text(self.metrics_path, "".join(kept))

    def remove_orphans(self) -> None:
        """Remove what writers killed mid-write left: temp files of the run's files and unfinished generations.

        Call it holding the run's lock (:func:`routesae.locks.writing`), so no live writer owns them.
        """
        remove_orphans(self.path, [MANIFEST_FILE, METRICS_FILE])
        if self.exists():
            for sae_dir in self.sae_dirs():
                if sae_dir.is_dir():
                    remove_orphans(sae_dir, [*PUBLISHED, TRAINER_STATE_FILE])
        if self.checkpoints_path.is_dir():
            for staging in self.checkpoints_path.glob(f".*{TEMP_SUFFIX}"):
                shutil.rmtree(staging, ignore_errors=True)

    def prepare(
        self,
        request: dict[str, Any],
        *,
        overwrite: bool,
        resume: bool,
        compare: Callable[[dict[str, Any], dict[str, Any]], RequestChanges],
    ) -> tuple[dict[str, Any] | None, RequestChanges | None]:
        """Refuse to mix runs in one directory; return (the manifest to resume from, how ``request`` changes its
        request), or (None, None) to start afresh.

        ``compare(recorded, request)`` says what differs; ``--resume`` accepts the changes it calls resumable. A run
        recorded ``failed`` before its first checkpoint (a plugin raised) holds nothing to keep and starts afresh.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RouteSAEError(f"--out {self.path} is a file; give a directory")
        if not self.exists():
            if resume:
                raise RouteSAEError(f"nothing to resume: {self.path} holds no run ({MANIFEST_FILE} is missing)")
            return None, None
        existing = self.read_manifest()
        if existing.get("status") == "failed" and not existing.get("progress", {}).get("step"):
            return None, None  # it failed before its first checkpoint: there is nothing to keep, start afresh
        changes = compare(existing.get("request", {}), request)
        finished = existing.get("status") == "finished"
        if resume:
            if not changes.resumable:
                raise RouteSAEError(
                    f"cannot resume: {self.path} holds a run with other settings ({changes.describe(changes.fixed())}); resume "
                    "with the run's own settings, or use --overwrite to start over"
                )
            if finished:
                raise RouteSAEError(f"{self.path} holds a finished run; nothing to resume (use --overwrite to retrain)")
            return existing, changes
        if overwrite:
            return None, None
        if changes.same and finished:
            raise RouteSAEError(f"{self.path} already holds this finished run; use --overwrite to train it again")
        if changes.resumable and not finished:
            also = f" with {changes.describe()} from its last checkpoint on" if not changes.same else ""
            raise RouteSAEError(f"{self.path} holds an unfinished run of these settings; continue it{also} with --resume "
                                "(or --overwrite)")
        raise RouteSAEError(
            f"{self.path} already holds a different run ({changes.describe()}); choose another --out, or --overwrite "
            "to replace it"
        )

    # -- checkpoint generations ---------------------------------------------------------------------
    def current_generation(self) -> Generation | None:
        """The generation ``run.json`` points at; a run written before generations existed is its own."""
        if not self.exists():
            return None
        manifest = self.read_manifest()
        if "checkpoint" in manifest:
            return Generation(self.path / manifest["checkpoint"])
        return Generation(self.path) if manifest.get("progress", {}).get("step") else None

    def begin_generation(self, step: int) -> Generation:
        """An empty temp directory to write the checkpoint of ``step`` into; :meth:`commit` puts it in place."""
        staging = self.checkpoints_path / f".step-{step:06d}{TEMP_SUFFIX}"
        shutil.rmtree(staging, ignore_errors=True)  # a killed writer's leftovers
        staging.mkdir(parents=True)
        return Generation(staging)

    def commit(self, staged: Generation, manifest: dict[str, Any]) -> Generation:
        """Make a fully written generation the current checkpoint, atomically as a whole.

        Rename it into place, publish each SAE's ``config.json`` and weights into its directory, then
        point ``run.json`` at it (the switch: one atomic replace) and drop older generations. Until
        the switch, ``run.json`` keeps pointing at the previous generation, which stays on disk: a
        run is never "finished" before its SAE directories hold its final weights.
        """
        final = staged.path.with_name(staged.path.name.removeprefix(".").removesuffix(TEMP_SUFFIX))
        shutil.rmtree(final, ignore_errors=True)  # a generation of this step that run.json never pointed at
        staged.path.rename(final)
        fsync_directory(final.parent)
        generation = Generation(final)
        self._publish_files(generation, manifest["saes"])
        self.update_manifest({**manifest, "checkpoint": final.relative_to(self.path).as_posix()})
        self._drop_generations_but(generation)
        return generation

    def publish(self, generation: Generation) -> None:
        """Publish the current ``generation`` again and drop every other: what resuming does first.

        A crash may have left the SAE directories partly published from a generation that never
        became current, or left generations nobody points at; this puts both right. Each file is
        replaced atomically, and ``load_sae`` checks that a config and its weights come from one checkpoint.
        """
        self._publish_files(generation, self.read_manifest()["saes"])
        self._drop_generations_but(generation)

    def _publish_files(self, generation: Generation, saes: list[dict[str, Any]]) -> None:
        """Link (or copy) each SAE's checkpoint files from ``generation`` into its directory."""
        for sae in saes:
            source, target = generation.sae_dir(sae["name"]), self.sae_dir(sae["name"])
            if source == target:
                continue  # a run from before generations: its files are already in place
            target.mkdir(parents=True, exist_ok=True)
            for name in PUBLISHED:
                _link_or_copy(source / name, target / name)
            (target / TRAINER_STATE_FILE).unlink(missing_ok=True)  # from a run begun before generations

    def _drop_generations_but(self, generation: Generation) -> None:
        if generation.path != self.path:
            (self.path / RNG_FILE).unlink(missing_ok=True)  # from a run begun before generations
        if self.checkpoints_path.is_dir():
            for other in self.checkpoints_path.iterdir():
                if other != generation.path:
                    shutil.rmtree(other, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` atomically: a hard link where the file system allows one, else a copy."""
    staging = target.with_name(f".{target.name}{TEMP_SUFFIX}")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:
        shutil.copyfile(source, staging)
    os.replace(staging, target)
    fsync_directory(target.parent)
