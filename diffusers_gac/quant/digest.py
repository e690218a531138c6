"""Digests that prove a checkpoint holds the bytes that were saved.

Every checkpoint of a calibrated model records, in the ``__metadata__`` of each of its safetensors files (and of
its shard index), a digest of every tensor the model saved, quantized and plain alike: its name, its dtype and shape
as the safetensors header gives them, and a SHA-256 of its bytes (:func:`state_dict_digest`, run by the quantizer's
``get_state_dict_and_metadata`` hook, so ``diffusers_gac.save_pretrained``, diffusers' own ``save_pretrained`` and
``push_to_hub`` all write it). The record also keeps the quantization options the weights were calibrated with, so a
``config.json`` or a shard set from another calibration is told apart from the weights' own.

Loading reads each file's header and bytes straight from disk and checks them against that record before any weight
is used (:func:`verify_files`): a changed byte, a changed header dtype or shape, a tensor added, dropped or swapped,
shards of another calibration, a truncated file or bytes appended after the last tensor are refused with an error
that names the file and the first tensors that differ. Checkpoints written before digests existed load with a
warning. A digest detects damage, not a deliberate forgery: whoever rewrites the file can rewrite its digest too
(the value checks of ``quant/checkpoint.py`` still apply to such a file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

DIGEST_KEY = "gac_digest"
DIGEST_VERSION = 1
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header
LISTED = 5  # differing tensors named in an error
HEX = 16  # hex digits kept of each SHA-256: 64 bits tell a damaged tensor apart; the record stays small
# torch dtypes as safetensors headers name them
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
                      torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
# diffusers' and transformers' weights files: name, variant, shard number, format, index
WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)(\.[\w-]+)?(-\d{5}-of-\d{5})?"
                         r"\.(safetensors|bin)(\.index\.json)?$")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class DigestError(ValueError):
    """A checkpoint file that is not what was saved (damaged, edited, truncated, or from another calibration)."""


def _hexdigest(data) -> str:
    return hashlib.sha256(data).hexdigest()[:HEX]


def tensor_hash(dtype: str, shape, data) -> str:
    """A tensor's digest: its header entry (dtype, shape) and its bytes."""
    h = hashlib.sha256(json.dumps([dtype, list(shape)]).encode())
    h.update(data)
    return h.hexdigest()[:HEX]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes safetensors writes for ``tensor`` (its contiguous CPU copy, little-endian as torch holds it)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def config_record(config) -> dict[str, Any]:
    """What of a GACConfig the weights depend on: its serialised options (format and calibration) and a digest of
    its layout. ``execution`` is a load-time choice and is not part of it."""
    d = config.to_dict()
    layout = d.pop("layout", None)
    d["layout_sha256"] = None if layout is None else _hexdigest(json.dumps(layout, sort_keys=True).encode())
    return json.loads(json.dumps(d, default=str))


def state_dict_digest(state_dict: Mapping[str, torch.Tensor], config) -> str:
    """The digest record of a state dict about to be saved, as the JSON string stored under ``gac_digest``: the
    tensors' digests concatenated in the order of their sorted names, a digest of those names, and the config."""
    names = sorted(state_dict)
    hashes = "".join(tensor_hash(SAFETENSORS_DTYPES.get(state_dict[n].dtype, str(state_dict[n].dtype)),
                                 state_dict[n].shape, tensor_bytes(state_dict[n])) for n in names)
    return json.dumps({"version": DIGEST_VERSION, "config": config_record(config), "names": _names_hash(names),
                       "count": len(names), "tensors": hashes}, separators=(",", ":"))


def _names_hash(names) -> str:
    return _hexdigest("\n".join(sorted(names)).encode())


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """A safetensors file's header (tensor entries and ``__metadata__``), the offset its data starts at and the
    file's size; a file that is not a complete safetensors file raises :class:`DigestError` saying what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise DigestError(f"{path} is not a safetensors file: it holds {size} bytes, fewer than the 8 of a header "
                          "length (an empty or truncated file)")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER or 8 + length > size:
            raise DigestError(f"{path} is not a complete safetensors file: its header claims {length} bytes but the "
                              f"file holds {size - 8} after the length (truncated or not safetensors)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise DigestError(f"{path} has a broken safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise DigestError(f"{path} has a broken safetensors header (a JSON {type(header).__name__}, not an object)")
    data_start, end = 8 + length, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DigestError(f"{path} has a broken safetensors header: tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if data_start + end > size:
        raise DigestError(f"{path} is truncated: its tensors need {data_start + end} bytes, the file holds {size}")
    if data_start + end < size:
        raise DigestError(f"{path} holds {size - data_start - end} bytes after its last tensor (appended data, or "
                          "not the file that was saved)")
    return header, data_start, size


def file_digest(path: str | os.PathLike) -> tuple[dict[str, str], str | None, list[str]]:
    """Read a safetensors file from disk: ``({name: digest}, its stored digest record or None,
    names of floating-point tensors holding NaN or inf)``."""
    header, data_start, size = read_header(path)
    meta = header.get("__metadata__") or {}
    found, non_finite = {}, []
    entries = sorted(((n, e) for n, e in header.items() if n != "__metadata__"), key=lambda t: t[1]["data_offsets"])
    with open(path, "rb") as f:
        for name, entry in entries:
            begin, end = entry["data_offsets"]
            f.seek(data_start + begin)
            data = f.read(end - begin)
            found[name] = tensor_hash(entry.get("dtype"), entry.get("shape") or [], data)
            dtype = FLOAT_DTYPES.get(entry.get("dtype"))
            if dtype is not None and data and len(data) % dtype.itemsize == 0:
                if not torch.isfinite(torch.frombuffer(bytearray(data), dtype=dtype)).all():
                    non_finite.append(name)
    return found, meta.get(DIGEST_KEY), non_finite


def verify_files(files: list[str | os.PathLike]) -> dict[str, Any] | None:
    """Check checkpoint files against the digests they carry: returns the digest record, or None if no file carries
    one (a checkpoint from before digests: the caller warns); raises :class:`DigestError` naming the file and the
    first tensors that differ. Whether the config matches is :func:`check_config`'s to say."""
    problems, found, where, record = [], {}, {}, None
    for path in files:
        tensors, stored, non_finite = file_digest(path)
        if non_finite:
            problems.append(f"{path}: {len(non_finite)} floating-point tensors hold non-finite values (NaN or inf), e.g. "
                            f"{', '.join(non_finite[:LISTED])}")
        found.update(tensors)
        where.update(dict.fromkeys(tensors, path))
        if stored is None:
            if record is not None or path != files[0]:
                problems.append(f"{path} carries no digest while other files of this checkpoint do")
            continue
        try:
            this = json.loads(stored)
            names, hashes = this["names"], this["tensors"]
            if len(hashes) != HEX * this["count"]:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise DigestError(f"{path}: its {DIGEST_KEY} metadata is not a digest record this diffusers-gac "
                              "reads") from None
        if record is None and path != files[0]:
            problems.append(f"{files[0]} carries no digest while other files of this checkpoint do")
        if record is not None and (names, hashes) != (record["names"], record["tensors"]):
            problems.append(f"{path} was saved with other tensors than {files[0]} (the files of two checkpoints)")
        record = record or this
    if record is None:
        if problems:
            raise DigestError("; ".join(problems))
        return None
    if _names_hash(found) != record["names"]:
        problems.append(f"the files hold {len(found)} tensors, not the {record['count']} that were saved with these "
                        "names (tensors added, dropped or renamed)")
    else:
        expected = dict(zip(sorted(found), (record["tensors"][i:i + HEX] for i in range(0, len(record["tensors"]), HEX))))
        changed = [n for n in sorted(found) if found[n] != expected[n]]
        if changed:
            problems.append(f"{len(changed)} tensors differ from those saved (bytes, dtype or shape), e.g. "
                            + ", ".join(f"{n} in {where[n]}" for n in changed[:LISTED]))
    if problems:
        raise DigestError("the checkpoint is not the one that was saved, so it was not loaded: " + "; ".join(problems))
    return record


def check_config(record: Mapping[str, Any], config, where: str) -> None:
    """Refuse a config that contradicts the options the weights were saved with (a config.json or weights from
    another calibration); options one side does not know (another release's) are skipped."""
    recorded, current = record.get("config") or {}, config_record(config)
    recorded = {**{k: v for k, v in recorded.items() if k != "calibration"}, **(recorded.get("calibration") or {})}
    current = {**{k: v for k, v in current.items() if k != "calibration"}, **(current.get("calibration") or {})}
    differ = [k for k, v in recorded.items() if k in current and current[k] != v]
    if differ:
        shown = ", ".join("the layout differs" if k == "layout_sha256" else
                          f"{k} is {current[k]!r} in config.json but {recorded[k]!r} in the weights" for k in differ)
        raise DigestError(f"{where}: the weights were saved with another quantization_config than config.json's "
                          f"({shown}): weights and config come from different calibrations, so it was not loaded")


def other_weight_files(files: list[str]) -> list[str]:
    """Weights files beside ``files`` (the set loading picked) of the same name and variant that are not in the set:
    a single file beside shards, or shards beside a single file."""
    picked = WEIGHT_FILE.match(Path(files[0]).name)
    if picked is None:
        return []
    names = {Path(f).name for f in files}
    return sorted(p.name for p in Path(files[0]).parent.iterdir() if p.name not in names and p.is_file()
                  and (m := WEIGHT_FILE.match(p.name)) and not m.group(5) and m.group(1, 2, 4) == picked.group(1, 2, 4))
