"""Many LoRA adapters on one base model in the transformers engine, each row of a batch with its own.

PEFT's mixed-batch forward (``adapter_names``: one name per row, :data:`BASE` for the base model)
runs the rows of every adapter, and of the base, in one forward pass: requests for different
adapters batch together. At most ``capacity`` adapters are held in memory; loading one more
unloads the least recently used one that no running row uses (one still in use stays until a
later load finds it free, so the bound can be passed by the adapters of rows running at once).
Loading and unloading change the model: they run on the engine's loop thread, between forward
passes (:meth:`LoraSlots.prepare`, called by the engine's prefill).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter a request is answered with: its name and its local PEFT folder."""

    name: str
    folder: Path


class LoraSlots:
    """The adapters held by one engine, least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("LoraSlots: capacity must be at least 1")
        self.capacity = capacity
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.loads = self.unloads = 0

    def prepare(self, model, needed: Iterable[Adapter], busy: set[str]):
        """``model`` holding every adapter in ``needed`` (the base model is wrapped by PEFT on the first
        one); the least recently used adapters beyond ``capacity`` that are not ``busy`` are unloaded."""
        for adapter in needed:
            if adapter.name in self.loaded:
                self.loaded.move_to_end(adapter.name)
                continue
            model = self._load(model, adapter)
        keep = busy | {adapter.name for adapter in needed}
        for name in [name for name in self.loaded if name not in keep][: max(0, len(self.loaded) - self.capacity)]:
            model.delete_adapter(name)
            del self.loaded[name]
            self.unloads += 1
            log.info("unloaded LoRA adapter %s (least recently used)", name)
        return model

    def _load(self, model, adapter: Adapter):
        from peft import PeftModel

        if self.loaded:
            model.load_adapter(str(adapter.folder), adapter_name=adapter.name)
        else:
            model = PeftModel.from_pretrained(model, str(adapter.folder), adapter_name=adapter.name)
        model.eval()
        self.loaded[adapter.name] = adapter.folder
        self.loads += 1
        log.info("loaded LoRA adapter %s from %s", adapter.name, adapter.folder)
        return model

    def forward_kwargs(self, adapters: list[Adapter | None]) -> dict:
        """What a forward pass over rows answered with ``adapters`` needs (nothing before the first load)."""
        if not self.loaded:
            return {}
        return {"adapter_names": [adapter.name if adapter else BASE for adapter in adapters]}
