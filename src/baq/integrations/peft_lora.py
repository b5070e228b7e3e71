"""PEFT's LoRA on baq's packed linears: fine-tune a quantized model, its codes frozen (QLoRA).

As QLoRA trains low-rank adapters on top of 4-bit weights, and PEFT does on GPTQ layers, each
:class:`~baq.saved.packed_linear.PackedLinear` is wrapped by :class:`PackedLoraLinear`: the
forward is the packed layer's own (its codes, grid and cache untouched, no gradient reaches them:
they are buffers) plus ``scaling * B(A(dropout(x)))`` per active adapter. PEFT learns the layer
type through its custom-module registry, so everything else is PEFT's own: ``get_peft_model``,
training, ``save_pretrained`` of the adapters and ``PeftModel.from_pretrained`` to load them::

    from peft import PeftModel, get_peft_model
    from baq.integrations.peft_lora import lora_config, register

    model = AutoModelForCausalLM.from_pretrained("my-model-3bit")       # packed linears
    peft_model = get_peft_model(model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    ...                                                                 # train the adapters
    peft_model.save_pretrained("adapters")
    # later, on a fresh load of the quantized folder
    tuned = PeftModel.from_pretrained(model, "adapters", config=register(
        LoraConfig.from_pretrained("adapters")))

Merging an adapter into the packed weights is refused: it would change the codes, which is a new
quantization, not a merge.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from baq.saved.packed_linear import PackedLinear


class PackedLoraLinear(nn.Module, LoraLayer):
    """LoRA adapters beside a frozen :class:`PackedLinear` (PEFT's layer protocol).

    Args:
        base_layer: the packed linear (or a PEFT layer already wrapping one).
        adapter_name: the adapter's name.
        config: the :class:`peft.LoraConfig`.
        r, lora_alpha: rank and scale of the adapter (PEFT passes them).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError(
                "DoRA rescales the base weight, which baq keeps packed: use plain LoRA"
            )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, A.weight.dtype)
            result = result + B(A(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(out_dtype)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "merging a LoRA adapter into baq's packed codes would requantize them: keep the "
            "adapter separate, or baq export the model and merge into the float weights"
        )

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _device_tensor(layer: PackedLinear) -> torch.Tensor:
    """A buffer of the packed layer: PEFT puts a new adapter on the device of its base layer's
    ``qweight`` (the name quantized layers of other libraries give their packed weight), and a
    packed layer has buffers only, no parameter it could look at instead."""
    return next(layer.buffers())


# read by PEFT only; the packed layer itself never uses the name
PackedLinear.qweight = property(_device_tensor)


def register(config: LoraConfig) -> LoraConfig:
    """``config`` with :class:`PackedLinear` mapped to :class:`PackedLoraLinear` (in place)."""
    config._register_custom_module({PackedLinear: PackedLoraLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """A :class:`peft.LoraConfig` (``kwargs`` as PEFT takes them) that knows baq's layers."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return register(LoraConfig(**kwargs))
