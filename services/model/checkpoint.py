"""Local safetensors checkpoints: selective reading and FP8 block-quantised writing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. FP8 checkpoints (DeepSeek-V3's own) store a linear weight as
``X.weight`` in float8_e4m3fn plus ``X.weight_scale_inv`` (float32, one per 128x128 block); the real
weight is ``q * scale_inv`` blockwise (the block format of ``epserve.kernels.fp8``). Reading is
selective: only the files holding the requested names are opened, and only the requested tensors are
read from them (safetensors maps lazily).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from epserve.kernels.fp8 import FP8_BLOCK, fp8_weight_quant

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"

# Linear weights that stay in high precision in DeepSeek's FP8 checkpoints.
_UNQUANTISED = re.compile(r"(embed_tokens|lm_head|shared_head\.head|mlp\.gate\.weight|norm|e_score_correction_bias)")


class CheckpointReader:
    """Tensor names -> tensors, for one local checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file_of = self._index()
        self.files_opened: set[str] = set()   # which files reads touched (tests assert selectivity)
        self.names_read: set[str] = set()

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / SINGLE_FILE
        if not single.exists():
            raise FileNotFoundError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly ``names`` (each must exist), opening only the files that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self._file_of:
                raise KeyError(f"tensor {name!r} not in checkpoint {self.path}")
            by_file[self._file_of[name]].append(name)
        out = {}
        for file, file_names in by_file.items():
            self.files_opened.add(file)
            with safe_open(self.path / file, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        self.names_read.update(out)
        return out


def is_quantisable(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not _UNQUANTISED.search(name)


def write_fp8_checkpoint(src: str | Path, dst: str | Path, num_shards: int = 3) -> None:
    """Copy checkpoint ``src`` to ``dst`` as an FP8 block-quantised, sharded checkpoint.

    Linear weights are quantised per 128 x 128 block (``fp8_weight_quant``, DeepSeek-V3's format);
    everything else is copied as is. ``config.json`` gains a ``quantization_config``; other small
    files are copied.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    reader = CheckpointReader(src)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in reader.read(reader.names()).items():
        if is_quantisable(name, tensor):
            tensors[name], tensors[name + SCALE_SUFFIX] = fp8_weight_quant(tensor)
        else:
            tensors[name] = tensor
    _write_shards(tensors, dst, num_shards)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / extra).exists():
            (dst / extra).write_text((src / extra).read_text())


def _write_shards(tensors: dict[str, torch.Tensor], dst: Path, num_shards: int) -> None:
    names = sorted(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        save_file({n: tensors[n].contiguous() for n in chunk}, str(dst / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2))
