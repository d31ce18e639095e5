"""The embedded default pair (DESIGN §3): a byte-level target and draft
BuiltinModel trained once by tools/train_default.py on the Python standard
library's sources, shipped as fp16 safetensors under weights/ with their
sha256 checksums in weights/default.json. Never downloaded, never trained
here; tests use random tiny models, so nothing but the demo needs these."""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional, Tuple, Union

import torch

from .dspark import DSparkConfig, DSparkDrafter, DSparkHead
from .model import BuiltinModel, ModelConfig
from .targets import BuiltinTarget

WEIGHTS_DIR = pathlib.Path(__file__).resolve().with_name("weights")
RECORD = "default.json"


class DefaultWeightsError(RuntimeError):
    """The embedded default weights are missing, altered or unreadable."""


def _dir(weights_dir) -> pathlib.Path:
    return pathlib.Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def default_record(weights_dir: Optional[Union[str, pathlib.Path]] = None) -> dict:
    """weights/default.json: the configs, checksums and training record."""
    path = _dir(weights_dir) / RECORD
    if not path.is_file():
        raise DefaultWeightsError(f"the embedded default model's record {path} is missing (train it with "
                                  f"tools/train_default.py, or reinstall dspark_ops with its package data)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DefaultWeightsError(f"{path} is not valid JSON: {e}") from None


def _read_checked(weights_dir: pathlib.Path, entry: dict, role: str) -> bytes:
    path = weights_dir / entry["file"]
    if not path.is_file():
        raise DefaultWeightsError(f"the embedded default {role} weights {path} are missing (train them with "
                                  f"tools/train_default.py, or reinstall dspark_ops with its package data)")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise DefaultWeightsError(f"the embedded default {role} weights {path} were altered: sha256 {digest}, "
                                  f"expected {entry['sha256']} (from {weights_dir / RECORD})")
    return data


def verify_default(weights_dir: Optional[Union[str, pathlib.Path]] = None) -> dict:
    """Check every shipped file (target, draft, and the DSpark head when the
    record lists one) against its sha256 in default.json; returns the record
    (raises DefaultWeightsError when a file is missing or altered)."""
    d = _dir(weights_dir)
    record = default_record(d)
    for role in ("target", "draft") + (("dspark",) if "dspark" in record else ()):
        _read_checked(d, record[role], role)
    return record


def _tensors(data: bytes) -> dict:
    """The tensors of a safetensors file's bytes."""
    try:
        from safetensors.torch import load as load_safetensors
    except ImportError:
        raise ImportError("the embedded default model needs `safetensors` (pip install safetensors, or "
                          "dspark_ops[demo])") from None
    return load_safetensors(data)


def _build(data: bytes, entry: dict, role: str, device, dtype) -> BuiltinModel:
    model = BuiltinModel(ModelConfig(**entry["config"]))
    tensors = _tensors(data)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        raise DefaultWeightsError(f"the default {role} weights do not match their config: {e}") from None
    return model.to(device=device, dtype=dtype).eval()


def load_default(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, *,
                 weights_dir: Optional[Union[str, pathlib.Path]] = None) -> Tuple[BuiltinTarget, BuiltinTarget]:
    """(target, draft) of the embedded default pair as BuiltinTargets, their
    checksums verified first (the weights are stored in fp16 and loaded as
    `dtype`). Use with the byte tokenizer (dspark_ops.decoding.tokenizer):

        target, draft = load_default()
        dec = SpeculativeDecoder(target, DraftModelDrafter(draft, num_draft=5))
    """
    d = _dir(weights_dir)
    record = default_record(d)
    out = []
    for role in ("target", "draft"):
        entry = record[role]
        out.append(BuiltinTarget(_build(_read_checked(d, entry, role), entry, role, device, dtype)))
    return out[0], out[1]


def load_default_dspark(target: BuiltinTarget, *, weights_dir: Optional[Union[str, pathlib.Path]] = None,
                        **drafter_kwargs) -> DSparkDrafter:
    """The DSpark block drafter of the embedded default target (its head
    trained by tools/train_dspark.py on the frozen target; checksum verified
    first), with the calibrated confidence temperatures of its record.
    drafter_kwargs go to DSparkDrafter (num_draft, schedule, sps_table,
    threshold):

        target, _ = load_default()
        dec = SpeculativeDecoder(target, load_default_dspark(target))
    """
    d = _dir(weights_dir)
    record = default_record(d)
    if "dspark" not in record:
        raise DefaultWeightsError(f"{d / RECORD} has no DSpark head (train it with tools/train_dspark.py)")
    entry = record["dspark"]
    head = DSparkHead(DSparkConfig(**entry["config"]))
    try:
        head.load_state_dict({k: v.float() for k, v in _tensors(_read_checked(d, entry, "dspark")).items()},
                             strict=True)
    except RuntimeError as e:
        raise DefaultWeightsError(f"the default DSpark head does not match its config: {e}") from None
    drafter_kwargs.setdefault("temperatures", torch.tensor(entry["confidence_temperatures"], dtype=torch.float32))
    return DSparkDrafter(target, head, **drafter_kwargs)
