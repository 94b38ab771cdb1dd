"""Checkpoints: official Lightning `.ckpt` files (read safely) and our own safetensors + JSON config format.

Official checkpoints are PyTorch zip archives whose pickle also holds Hydra/OmegaConf objects. We never run the
pickle's code: `SafeUnpickler` rebuilds tensors and plain containers, turns every other class into an inert
`Placeholder`, and refuses (before calling anything) a pickle that tries to call a function outside a short list
of data-only constructors.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bsmamba2.config import BSMamba2Config, Mamba2Config, ModelConfig, RoFormerConfig, config_from_dict, config_to_dict

log = logging.getLogger(__name__)

FORMAT_NAME = "bsmamba2"
FORMAT_VERSION = "1"


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle tried to call something that is not a plain-data constructor."""


# ---------------------------------------------------------------- safe unpickling of official checkpoints

class Placeholder:
    """Stands in for any class the pickle names that we do not import (OmegaConf, Lightning, ...).

    It records the state the pickle gave it and does nothing else."""

    _qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


_placeholder_types: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _placeholder_types:
        _placeholder_types[key] = type(name, (Placeholder,), {"_qualname": key, "__module__": "bsmamba2.inert"})
    return _placeholder_types[key]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    untyped, dtype = storage  # as returned by SafeUnpickler.persistent_load
    t = torch.empty((0,), dtype=dtype)
    t.set_(untyped, storage_offset, torch.Size(size), stride)
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}

# Callables a checkpoint's pickle may call (REDUCE): plain-data constructors only.
_CALLABLE = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "tuple"): tuple,
    ("builtins", "list"): list, ("builtins", "dict"): dict, ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
}
# Builtin types that may appear as values (OmegaConf stores them as node metadata); never called.
_SAFE_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "bytes": bytes, "dict": dict, "list": list,
               "tuple": tuple, "set": set, "object": object, "NoneType": type(None)}


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler lets us intercept REDUCE
    """Unpickles the data part of a torch zip archive without executing pickled code."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file, fix_imports=True, encoding="utf-8")
        self._archive, self._prefix, self._source = archive, prefix, source
        self._storages: dict[str, Any] = {}

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins"}.get(module, module)
        if (module, name) in _CALLABLE:
            return _CALLABLE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "builtins" and name in _SAFE_TYPES:
            return _SAFE_TYPES[name]
        if module == "builtins" and name == "long":
            return int
        return _placeholder(module, name)

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel): raw bytes live in <prefix>/data/<key>
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}/data/{key}"))
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self._storages[key] = (untyped, dtype)
        return self._storages[key]

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in _CALLABLE.values()):
            what = getattr(func, "_qualname", None) or getattr(func, "__qualname__", repr(func))
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load: the checkpoint's pickle tries to call {what}. Nothing was run. "
                "Only load checkpoints from sources you trust; official BSMamba2 checkpoints never do this.")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The unpickled top-level dict of an official Lightning checkpoint, read without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch zip checkpoint (legacy pickle files are not supported; "
                         "re-save it with torch.save in a recent PyTorch)")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("/data.pkl")]
        unpickler = SafeUnpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix, str(path))
        try:
            obj = unpickler.load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: corrupt or unsupported checkpoint ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict at the top of the checkpoint, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- config inference from official weights

_MIXER = re.compile(r"^layers\.0\.0\.forward_blocks\.0\.mixer\.")


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Rebuild the model config from the tensor shapes of an official state dict (without the `model.` prefix)."""
    try:
        dim = state["final_norm.gamma"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        n_bands = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("band_split.to_features."))
        feats = [state[f"band_split.to_features.{i}.0.gamma"].shape[0] for i in range(n_bands)]
        n_stems = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("mask_estimators."))
        est_linears = {k.split(".")[5] for k in state if k.startswith("mask_estimators.0.to_freqs.0.0.")}
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a BSMamba2/BS-RoFormer state dict: missing {err}") from err
    est_depth = len(est_linears)  # Linear layers of the per-band MLP
    n_bins = 1025  # n_fft 2048, as every official model
    # features per band = 2 · channels · width; the widths must cover all STFT bins
    for channels in (2, 1):
        widths = tuple(f // (2 * channels) for f in feats)
        if all(f % (2 * channels) == 0 for f in feats) and sum(widths) == n_bins:
            break
    else:
        raise ValueError(f"band feature sizes {feats} fit neither a stereo nor a mono split of {n_bins} bins")
    stereo = channels == 2
    stems = ("vocals",) if n_stems == 1 else tuple(f"stem{i}" for i in range(n_stems))
    common = dict(dim=dim, depth=depth, stereo=stereo, stems=stems, band_widths=widths,
                  mask_estimator_depth=est_depth)
    if "layers.0.0.forward_blocks.0.mixer.A_log" in state:
        nheads = state["layers.0.0.forward_blocks.0.mixer.A_log"].shape[0]
        d_inner = state["layers.0.0.forward_blocks.0.mixer.out_proj.weight"].shape[1]
        conv_dim, _, d_conv = state["layers.0.0.forward_blocks.0.mixer.conv1d.weight"].shape
        d_in_proj = state["layers.0.0.forward_blocks.0.mixer.in_proj.weight"].shape[0]
        assert d_in_proj == d_inner + conv_dim + nheads, "in_proj does not split into [z, xBC, dt]"
        two_gn = conv_dim - d_inner  # 2 · ngroups · d_state
        # ngroups is not visible in shapes except through the gated norm's group size; official models use 1
        mamba = Mamba2Config(expand=d_inner // dim, d_state=two_gn // 2, headdim=d_inner // nheads, d_conv=d_conv,
                             ngroups=1)
        return BSMamba2Config(mamba=mamba, **common)
    if "layers.0.0.layers.0.0.to_qkv.weight" in state:
        heads = state["layers.0.0.layers.0.0.to_gates.weight"].shape[0]
        qkv = state["layers.0.0.layers.0.0.to_qkv.weight"].shape[0]
        ff_inner = state["layers.0.0.layers.0.1.net.1.weight"].shape[0]
        return RoFormerConfig(heads=heads, dim_head=qkv // 3 // heads, ff_mult=ff_inner // dim, **common)
    raise ValueError("state dict has neither Mamba2 nor transformer layers")


def official_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`model.*` tensors of a Lightning checkpoint, prefix removed (STFT window buffers etc. dropped)."""
    sd = ckpt.get("state_dict")
    if "ema" in ckpt and "optimizer" in ckpt:
        raise ValueError("this is a bsmamba2 training checkpoint (last.pt/best.pt); turn it into a model file with "
                         "`bsmamba2 export RUN_DIR` and use the .safetensors it writes")
    if not isinstance(sd, dict):
        raise ValueError("checkpoint has no 'state_dict'; is it an official BSMamba2 Lightning checkpoint?")
    # rotary tables are recomputed, not loaded (the official class stores them as parameters)
    out = {k[len("model."):]: v for k, v in sd.items()
           if k.startswith("model.") and isinstance(v, torch.Tensor) and ".rotary_embed." not in k}
    if not out:
        raise ValueError("checkpoint 'state_dict' has no 'model.*' weights")
    return out


# ---------------------------------------------------------------- our format

def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write weights as safetensors with the config (and any `metadata`) as JSON in the header. Atomic.

    `dtype` (e.g. torch.float16) stores floating-point weights at that precision to halve the file; loading casts
    them back to the model's float32 parameters."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "config": json.dumps(config_to_dict(model.config))}
    if metadata:
        header["metadata"] = json.dumps(metadata)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata stored by `save_model` (config and extra metadata), without loading weights."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: a safetensors file, but not a bsmamba2 model (no bsmamba2 config in its header)")
    return {"config": json.loads(header["config"]), "metadata": json.loads(header.get("metadata", "{}"))}


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model from our `.safetensors` format or an official Lightning `.ckpt`; returns it in eval mode."""
    from bsmamba2.build import build_model  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        state = official_state_dict(read_official_checkpoint(path))
        config = infer_config(state)
        source = "official checkpoint"
    else:
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            config = config_from_dict(read_metadata(path)["config"])
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable checkpoint ({err}); expected an official .ckpt or a "
                             "bsmamba2 .safetensors file") from err
        source = "bsmamba2 safetensors"
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the model they describe: {err}") from err
    log.debug("loaded %s %s (%s)", source, path, type(model).__name__)
    return model.to(map_location).eval()
