"""Saving calibrated models and pipelines: atomically, with their calibration reports.

diffusers' own ``model.save_pretrained`` / ``pipeline.save_pretrained`` write a calibrated model like any other
quantized one (the "gac" quantizer declares itself serialisable), straight into the target folder.
:func:`save_pretrained` wraps them: it writes everything into a temporary sibling folder, adds each calibrated
component's report (``gac_calibration.json``) and learned-weights plot (``gac_calibration.png``) beside its
``config.json``, and swaps the folder in at the end, so a save that fails or is interrupted leaves the previous
folder (or none), never a partial checkpoint (:func:`replace_folder_atomically`).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from torch import nn

from .calibration.plots import plot_calibration
from .config import GACConfig
from .quant.digest import WEIGHT_FILE
from .quantizer import REPORT_NAME

PLOT_NAME = "gac_calibration.png"


def gac_config(model: nn.Module) -> GACConfig | None:
    """The GACConfig a calibrated model carries in its config, or None."""
    config = getattr(model, "config", None)
    qc = config.get("quantization_config") if hasattr(config, "get") else None
    if isinstance(qc, dict) and qc.get("quant_method") == "gac":
        qc = GACConfig.from_dict(qc)
    return qc if isinstance(qc, GACConfig) else None


def calibration_report(model: nn.Module) -> dict[str, Any] | None:
    """The report of the calibration that produced ``model`` (None if unknown, e.g. after a download by repo id
    of a checkpoint pushed without one)."""
    return getattr(getattr(model, "hf_quantizer", None), "calibration_report", None)


def quantized_components(obj) -> dict[str, nn.Module]:
    """``{"": model}`` for a calibrated model, ``{component name: model}`` for a pipeline's calibrated parts."""
    if isinstance(obj, nn.Module):
        return {"": obj} if gac_config(obj) is not None else {}
    components = getattr(obj, "components", {}) or {}
    return {name: m for name, m in components.items() if isinstance(m, nn.Module) and gac_config(m) is not None}


def write_checkpoint(obj, folder: str | Path, **save_kwargs) -> dict[str, str]:
    """Write a model or pipeline with diffusers' own ``save_pretrained`` into ``folder``, plus each calibrated
    component's report and plot; returns ``{component: plot path relative to folder}`` for the plots written."""
    folder = Path(folder)
    obj.save_pretrained(folder, **save_kwargs)
    plots = {}
    for name, model in quantized_components(obj).items():
        report = calibration_report(model)
        where = folder / name if name else folder
        for stale in (REPORT_NAME, PLOT_NAME):  # a report or plot an earlier save left describes another model
            (where / stale).unlink(missing_ok=True)
        if not report:
            continue
        (where / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if any(u.get("weighting") for u in report.get("units") or []):
            plot_calibration(report["units"], where / PLOT_NAME)
            plots[name] = str((where / PLOT_NAME).relative_to(folder))
    return plots


def save_pretrained(obj, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """Save a calibrated model or a pipeline atomically, with calibration reports (see the module docstring).
    ``save_kwargs`` go to diffusers' ``save_pretrained`` (``max_shard_size``, ``safe_serialization``, ...). Files the
    folder already held are kept, as diffusers keeps them, except the old weights, shards and shard indexes."""
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"save_pretrained: {target} is a file, not a folder")
    replace_folder_atomically(target, lambda tmp: write_checkpoint(obj, tmp, **save_kwargs), keep_existing=True)


def replace_folder_atomically(target: Path, write, *, keep_existing: bool = False) -> None:
    """Run ``write(folder)`` into a temporary sibling, then swap it in for ``target``: a write that fails or is
    interrupted leaves the previous ``target`` (or none), never a partial folder. A ``target`` that is a symbolic link
    is followed: the folder it points to is replaced and the link kept. With ``keep_existing`` the files
    ``target`` already holds are copied in first, so ``write`` adds to them (minus old weights and shard indexes,
    which the new save replaces).

    The folder is written at ``.<name>.partial-<host>-<pid>-<id>/<name>`` and the old one is set aside at
    ``.<name>.previous-.../<name>`` during the swap, so neither sibling has a ``config.json`` at its root and neither
    loads as a model. Siblings left by a save that was killed are removed by the next save of ``target`` (an old
    folder set aside is put back first if ``target`` is missing). New folders and files get the permissions a plain
    ``mkdir`` and ``open`` give (the umask's), not the owner-only ones of temporary files."""
    target = Path(target)
    if target.is_symlink():  # write where the link points (the link stays); swapping the link itself would drop it
        target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(target)
    tmp, backup = make_sibling(target, "partial"), make_sibling(target, "previous")
    folder = tmp / target.name
    try:
        if keep_existing and target.is_dir():
            shutil.copytree(target, folder, ignore=_replaced_by_a_save)
            kept = {folder, *folder.rglob("*")}
        else:
            folder.mkdir()
            kept = set()
        write(folder)
        _give_default_permissions(folder, kept, tmp.stat().st_mode & 0o777)
        if target.exists():
            os.replace(target, backup / target.name)
        os.replace(folder, target)
    except BaseException:
        if (backup / target.name).exists() and not target.exists():
            os.replace(backup / target.name, target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.exists() or not (backup / target.name).exists():  # never the only copy of the old folder
            shutil.rmtree(backup, ignore_errors=True)


SIBLING_KINDS = ("partial", "previous")


def _replaced_by_a_save(folder: str, names: list[str]) -> list[str]:
    """Files of the old folder that a new save rewrites or must not inherit: weights, shards and shard indexes
    (a stale index would point at the shards of the previous save)."""
    return [n for n in names if WEIGHT_FILE.match(n) and os.path.isfile(os.path.join(folder, n))]


def make_sibling(target: Path, kind: str) -> Path:
    """A new empty folder ``.<name>.<kind>-<host>-<pid>-<id>`` beside ``target``, made as ``mkdir`` makes one."""
    while True:
        path = target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


def _is_stale(rest: str) -> bool:
    """Whether the save that made a sibling (``rest``: ``<host>-<pid>-<id>``) is over: its process on this machine
    has ended. Siblings of older releases (``mkdtemp`` names, no pid) were left only by saves that were killed."""
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname() or pid == os.getpid():
        return False  # another machine's save may still be running; this process's own is running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # the process exists (another user's)
        return False
    return False


def clean_stale_siblings(target: Path) -> None:
    """Remove the temporary siblings of ``target`` that killed saves left; if ``target`` is missing because a save
    was killed in the middle of the swap, the old folder it had set aside is put back first."""
    found = []
    for kind in SIBLING_KINDS:
        prefix = f".{target.name}.{kind}-"
        for sibling in target.parent.glob(glob.escape(prefix) + "*"):
            if sibling.is_dir() and not sibling.is_symlink() and _is_stale(sibling.name[len(prefix):]):
                found.append((kind, sibling))
    for kind, sibling in sorted(found, key=lambda item: item[1].stat().st_mtime, reverse=True):
        old = sibling / target.name if (sibling / target.name).is_dir() else sibling  # older releases: no nesting
        if kind == "previous" and not target.exists() and any(old.iterdir()):
            os.replace(old, target)
        shutil.rmtree(sibling, ignore_errors=True)


def _give_default_permissions(folder: Path, kept: set[Path], dir_mode: int) -> None:
    """What ``write`` created gets the modes ``mkdir`` and ``open`` give under the umask (``dir_mode`` is that of a
    folder just made by ``mkdir``); some writers, safetensors among them, create owner-only files. Files copied
    from the previous folder keep theirs."""
    file_mode = dir_mode & 0o666
    for path in [folder, *folder.rglob("*")]:
        if path not in kept and not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)
