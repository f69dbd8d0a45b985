"""Many LoRA adapters on one base model in the transformers engine, each row of a batch with its own.

Every linear layer an adapter targets gets a forward of its own (:class:`_LoraForward`, around
whatever forward it had: torch's or the prepacked one) holding the low-rank weights of all loaded
adapters stacked in slots, slot 0 the base's zeros. A forward pass adds, for every row, its slot's
``x @ A.T @ B.T``: the rows are multiplied by every slot's A at once, the columns of other slots
masked out, then by B; so rows of any adapters and of the base share one pass at the cost of two
small dense matmuls per layer (a few adapters of rank 16 add ~100 columns to layers of 576).
PEFT's own mixed batch splits the rows per adapter in Python in every layer: 0.29x the base's
throughput with 8 clients over 4 adapters (2 cores); gathering each row's weights (Punica's BGMV)
0.75x; this, see benchmarks/lora_throughput.py. With no row on an adapter a layer costs a check.

Adapters are PEFT folders (``adapter_config.json``, ``adapter_model.safetensors``) of plain LoRA
(no DoRA, bias, ``modules_to_save`` or ``alpha_pattern``; :func:`check_adapter` says which);
``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) is folded into B. At most ``capacity`` adapters
are held; loading one more unloads the least recently used one that no running row uses (one still
in use stays until a later load finds it free, so rows running at once can pass the bound).
Loading changes the layers: it runs on the engine's loop thread, between forward passes.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "alpha_pattern": "alpha_pattern",
               "fan_in_fan_out": "fan_in_fan_out", "lora_bias": "lora_bias"}  # fmt: skip


class AdapterError(ValueError):
    """An adapter folder this engine cannot serve; the message says why."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter a request is answered with: its name and its local PEFT folder."""

    name: str
    folder: Path


def check_adapter(folder: Path) -> dict:
    """The adapter's config, if this engine can serve it; raises AdapterError naming what it cannot."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder}: no readable adapter_config.json ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA is served")
    used = [label for key, label in UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"bias: {config['bias']}")
    if used:
        raise AdapterError(f"{folder}: LoRA with {', '.join(used)} is not served; plain LoRA is")
    return config


class _Rows:
    """The forward pass under way: each row's slot (None: every row on the base), and the masks that
    keep a row's tokens to its slot's columns, made once per pass and shape."""

    def __init__(self) -> None:
        self.index, self._masks = None, {}

    def set(self, index) -> None:
        self.index, self._masks = index, {}

    def mask(self, owner, slots: int, rank: int, count: int, dtype):
        """[count, slots * rank]: 1 where a column (its slot: ``owner``) is its row's slot; ``count`` is
        rows x the tokens each feeds to this layer (the prompt's, or 1: a decode step, the LM head)."""
        key = (slots, rank, count, dtype)
        if key not in self._masks:
            mine = (self.index[:, None] == owner).to(dtype)
            self._masks[key] = mine.repeat_interleave(count // len(self.index), dim=0)
        return self._masks[key]


class _LoraForward:
    """A linear layer's forward plus, per row, its adapter's low-rank update (slot 0: none).

    The slots' A and B are stacked along the rank: ``a`` [slots * rank, in], ``b`` [slots * rank,
    out] (B transposed, scaling folded in). A pass multiplies every row by all slots' A at once,
    zeroes the columns of the slots that are not the row's, and multiplies by B: two dense matmuls
    whatever the mix of adapters, no per-row copies of weights."""

    def __init__(self, base, in_features: int, out_features: int, rows: _Rows, like) -> None:
        import torch

        self.base, self.rows = base, rows
        self.slots, self.rank = 1, 1
        self.a = like.new_zeros(1, in_features)
        self.b = like.new_zeros(1, out_features)
        self.a_t = self.a.T.contiguous()  # [in, slots * rank]: what a pass multiplies by
        self.owner = torch.zeros(1, dtype=torch.long, device=like.device)  # each column's slot

    def __call__(self, x):
        y = self.base(x)
        if self.rows.index is None:
            return y
        y = y if y.is_contiguous() else y.contiguous()
        low = x.reshape(-1, x.shape[-1]).mm(self.a_t)  # [rows * tokens, slots * rank]
        low.mul_(self.rows.mask(self.owner, self.slots, self.rank, low.shape[0], low.dtype))
        y.view(-1, y.shape[-1]).addmm_(low, self.b)
        return y

    def put(self, slot: int, a, b) -> None:
        """Write an adapter's A [rank, in] and scaled B [out, rank] into ``slot`` (growing slots or rank)."""
        slots, rank = max(self.slots, slot + 1), max(self.rank, a.shape[0])
        if (slots, rank) != (self.slots, self.rank):
            grown_a = self.a.new_zeros(slots, rank, self.a.shape[1])
            grown_b = self.b.new_zeros(slots, rank, self.b.shape[1])
            grown_a[: self.slots, : self.rank] = self.a.reshape(self.slots, self.rank, -1)
            grown_b[: self.slots, : self.rank] = self.b.reshape(self.slots, self.rank, -1)
            self.a, self.b = grown_a.reshape(slots * rank, -1), grown_b.reshape(slots * rank, -1)
            self.slots, self.rank = slots, rank
            self.owner = self.owner.new_tensor(range(slots)).repeat_interleave(rank)
        self.clear(slot)
        self.a[slot * rank : slot * rank + a.shape[0]] = a.to(self.a.dtype)
        self.b[slot * rank : slot * rank + a.shape[0]] = b.T.to(self.b.dtype)
        self.a_t = self.a.T.contiguous()

    def clear(self, slot: int) -> None:
        if slot < self.slots:
            self.a[slot * self.rank : (slot + 1) * self.rank].zero_()
            self.b[slot * self.rank : (slot + 1) * self.rank].zero_()
            self.a_t = self.a.T.contiguous()


class LoraSlots:
    """The adapters held by one engine's model, least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("LoraSlots: capacity must be at least 1")
        self.capacity = capacity
        self.loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot
        self.loads = self.unloads = 0
        self._rows = _Rows()
        self._layers: dict[str, _LoraForward] = {}  # module path -> its forward

    def prepare(self, model, needed: Iterable[Adapter], busy: set[str]) -> None:
        """Load every adapter in ``needed`` into ``model``'s layers; unload the least recently used
        adapters beyond ``capacity`` that are not ``busy`` (nor needed)."""
        needed = list(needed)
        keep = busy | {adapter.name for adapter in needed}
        for adapter in needed:
            if adapter.name in self.loaded:
                self.loaded.move_to_end(adapter.name)
                continue
            spare = [name for name in self.loaded if name not in keep]
            if len(self.loaded) >= self.capacity and spare:
                self._unload(spare[0])
            self._load(model, adapter)

    def _load(self, model, adapter: Adapter) -> None:
        config, weights = read_adapter(adapter.folder)
        slot = min(set(range(1, len(self.loaded) + 2)) - set(self.loaded.values()))
        pairs = lora_pairs(weights, adapter.folder)
        for path, (a, b) in pairs.items():
            self._layer(model, path, adapter).put(slot, a, b * scaling(config, a.shape[0]))
        for path in set(self._layers) - set(pairs):  # layers other adapters target: this one adds nothing
            self._layers[path].clear(slot)
        self.loaded[adapter.name] = slot
        self.loads += 1
        log.info("loaded LoRA adapter %s (%d layers) from %s into slot %d", adapter.name, len(pairs),
                 adapter.folder, slot)  # fmt: skip

    def _layer(self, model, path: str, adapter: Adapter) -> _LoraForward:
        if path not in self._layers:
            import torch

            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"adapter {adapter.name}: the base model has no layer {path}") from None
            if not isinstance(module, torch.nn.Linear):
                raise AdapterError(f"adapter {adapter.name}: {path} is not a linear layer")
            like = model.get_input_embeddings().weight  # the model's dtype and device
            wrapped = _LoraForward(module.forward, module.in_features, module.out_features, self._rows, like)
            module.forward = self._layers[path] = wrapped
        return self._layers[path]

    def _unload(self, name: str) -> None:
        slot = self.loaded.pop(name)
        for layer in self._layers.values():
            layer.clear(slot)
        self.unloads += 1
        log.info("unloaded LoRA adapter %s (least recently used)", name)

    def select(self, adapters: list[Adapter | None], device) -> None:
        """Before a forward pass over rows answered with ``adapters`` (None: the base): their slots."""
        import torch

        slots = [self.loaded[adapter.name] if adapter else 0 for adapter in adapters]
        self._rows.set(torch.tensor(slots, device=device) if any(slots) else None)


def scaling(config: dict, rank: int) -> float:
    """PEFT's scale of a layer's LoRA update ``B @ A``: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA."""
    return config.get("lora_alpha", rank) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_adapter(folder: Path) -> tuple[dict, dict]:
    """The adapter's config (checked: :func:`check_adapter`) and its tensors by PEFT's names; raises
    AdapterError naming the folder when the weights file is missing or unreadable."""
    from safetensors.torch import load_file

    config = check_adapter(folder)
    try:
        return config, load_file(str(Path(folder) / "adapter_model.safetensors"))
    except Exception as exc:  # missing, unreadable, or not safetensors
        raise AdapterError(f"{folder}: cannot read adapter_model.safetensors ({exc})") from None


def folded_weights(folder: Path) -> dict:
    """The adapter's tensors under PEFT's names, in float32, with each layer's scale folded into its
    B: what an engine that applies ``B @ A`` as given (OpenVINO GenAI) must be handed."""
    config, stored = read_adapter(folder)
    weights = {key: tensor.float() for key, tensor in stored.items()}
    lora_pairs(weights, folder)  # refuses a file without complete pairs
    return {key: tensor * scaling(config, tensor.shape[1]) if key.endswith(".lora_B.weight") else tensor
            for key, tensor in weights.items()}  # fmt: skip


def lora_pairs(weights: dict, folder: Path) -> dict[str, tuple]:
    """``{module path: (A, B)}`` from PEFT's saved keys (``base_model.model.<path>.lora_A.weight``)."""
    pairs: dict[str, list] = {}
    for key, tensor in weights.items():
        for part, position in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                path = key.removeprefix("base_model.model.").removesuffix(part)
                pairs.setdefault(path, [None, None])[position] = tensor
    if not pairs or any(a is None or b is None for a, b in pairs.values()):
        raise AdapterError(f"{folder}: adapter_model.safetensors has no complete lora_A/lora_B pairs")
    return {path: (a, b) for path, (a, b) in pairs.items()}
