"""Find the decoder blocks of a Hugging Face causal LM and the linears inside them; run them.

Architectures are data: ``BLOCK_PATHS`` lists where known model families keep their decoder
blocks, with a generic fallback, so a new family is one string here, never a new driver. Block
inputs come from the model's own forward (a pre-hook on block 0), so masks, position ids and
rotary embeddings are exactly what the model would pass; nothing about attention is
re-implemented.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

# Where each family keeps its decoder blocks, tried in order; the first nn.ModuleList found wins.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Phi, Gemma and most recent families
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # text stacks inside multimodal wrappers (Gemma 3, Llava)
    "transformer.blocks",  # MPT
)

# Block kwargs that carry a KV cache: calibration runs one block at a time with no cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Find the list of decoder blocks: a known path from ``BLOCK_PATHS``, else a generic guess.

    The guess is the longest ``nn.ModuleList`` whose children all share one class, among those
    not nested in another such list (so a list of MoE experts inside a block never wins).

    Args:
        model: a causal LM (``XForCausalLM``).
    Returns:
        The ``nn.ModuleList`` of blocks, in execution order.
    """
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    best: nn.ModuleList | None = None
    inside: set[int] = set()  # ids of modules below an already accepted candidate
    for _, module in model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        inside.update(id(m) for m in module.modules())
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise ValueError(
            f"no decoder blocks found in {type(model).__name__}: none of "
            f"{', '.join(BLOCK_PATHS)} exists and no nn.ModuleList holds identical blocks; "
            "add the path of its blocks to baq.model.blocks.BLOCK_PATHS"
        )
    log.debug("%s: decoder blocks found by the generic fallback", type(model).__name__)
    return best


def module_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    """``'model.layers.'``: the name of the block list inside ``model``, with a trailing dot."""
    for name, mod in model.named_modules():
        if mod is layers:
            return f"{name}."
    raise ValueError("decoder blocks are not a submodule of the model")


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation between the last block and the LM head (Llama ``norm``, OPT
    ``final_layer_norm``, GPT-2 ``ln_f``), found beside the block list."""
    layers = decoder_layers(model)
    for mod in model.modules():
        if any(child is layers for child in mod.children()):
            for name in ("norm", "final_layer_norm", "ln_f", "final_norm"):
                if isinstance(getattr(mod, name, None), nn.Module):
                    return getattr(mod, name)
    raise ValueError(f"{type(model).__name__}: no final norm found beside the decoder blocks")


def linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of one block, in registration order.

    Args:
        block: one decoder block.
    Returns:
        Name relative to the block (e.g. ``self_attn.q_proj``) -> ``nn.Linear`` or transformers'
        ``Conv1D`` (GPT-2, whose weight is stored transposed as (in, out)).
    """
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


def get_weight(module: nn.Module) -> Tensor:
    """A copy of the weight as (out_features, in_features), in the module's dtype and device.

    A copy rather than a view so that solvers may update it in place without touching the model.

    Args:
        module: ``nn.Linear`` (weight (out, in)) or ``Conv1D`` (weight (in, out)).
    Returns:
        (out_features, in_features) tensor.
    """
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.t()
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"{type(module).__name__} is not nn.Linear or Conv1D")
    return weight.clone()


def set_weight(module: nn.Module, W: Tensor) -> None:
    """Write ``W`` into the module's weight in place, cast to the module's dtype and device.

    Args:
        module: ``nn.Linear`` or ``Conv1D``.
        W: (out_features, in_features) new weight, any float dtype or device.
    """
    target = module.weight
    if isinstance(module, Conv1D):
        W = W.t()  # Conv1D computes x @ weight, so it stores (in, out)
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"{type(module).__name__} is not nn.Linear or Conv1D")
    if W.shape != target.shape:
        raise ValueError(
            f"weight shape {tuple(W.shape)} does not match {tuple(target.shape)} of "
            f"{type(module).__name__}"
        )
    with torch.no_grad():
        target.copy_(W)


def move_kwargs(kwargs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor in a block's kwargs to ``device``, also inside tuples and lists.

    Args:
        kwargs: block keyword arguments, e.g. ``position_embeddings`` = (cos, sin).
        device: target device.
    Returns:
        A new dict; non-tensor values are kept as they are.
    """

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        return value

    return {key: move(value) for key, value in kwargs.items()}


class _BlockReached(Exception):
    """Raised by the block-0 pre-hook to stop the model's forward once its inputs are known."""


def _first_block_call(
    model: nn.Module, block: nn.Module, input_ids: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run ``model`` on ``input_ids`` until ``block`` is called; return that call's args, kwargs."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, kwargs
        raise _BlockReached

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _BlockReached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} finished its forward without calling block 0")
    return seen["args"], seen["kwargs"]


def _as_kwargs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, dict[str, Any]]:
    """Split a block call into hidden states and keyword arguments only.

    Some models pass more than the hidden states positionally (GPT-2 passes the cache and mask),
    so extra positional values are named from the block's ``forward`` signature.
    """
    kwargs = dict(kwargs)
    if not args:
        if "hidden_states" not in kwargs:
            raise ValueError(f"cannot find the hidden states in the call of {type(block).__name__}")
        return kwargs.pop("hidden_states"), kwargs
    params = inspect.signature(block.forward).parameters.values()
    names = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    if len(args) > len(names):
        raise ValueError(f"{type(block).__name__} takes more positional inputs than it names")
    kwargs.update(zip(names[1:], args[1:]))
    return args[0], kwargs


def _embedding_side(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The largest submodules of ``model`` that hold no decoder block and are not the LM head.

    These are what a forward touches before block 0 (embeddings, positional and rotary
    embeddings, pre-block norms or projections) plus small leftovers such as the final norm,
    which is cheaper to move along than to identify per family. Tensors registered directly on
    a module that also holds the blocks are not covered (no supported family has any).
    """
    skip = {id(blocks)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        skip.add(id(head))
    holders: set[int] = set()  # modules with a skipped module somewhere below them
    for name, module in model.named_modules():
        if id(module) in skip:
            parts = name.split(".") if name else []
            for i in range(len(parts)):
                holders.add(id(model.get_submodule(".".join(parts[:i]))))
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in skip:
                continue
            if id(child) in holders:
                walk(child)
            else:
                found.append(child)

    walk(model)
    return found


@contextmanager
def _moved(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration of the block, then back where they were."""
    homes = []
    for module in modules:
        tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
        if tensor is not None and tensor.device != device:
            homes.append((module, tensor.device))
            module.to(device)
    try:
        yield
    finally:
        for module, home in homes:
            module.to(home)


def _warn_mixed_attention(model: nn.Module, seqlen: int) -> None:
    """Warn when block 0's attention mask is not valid for every block (sliding-window layers)."""
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if len(kinds) > 1 and window and seqlen > window:
        log.warning(
            "%s mixes layer types (%s) and seqlen %d exceeds its sliding window %d: every block "
            "gets block 0's attention mask; use seqlen <= %d",
            type(model).__name__,
            ", ".join(sorted(kinds)),
            seqlen,
            window,
            window,
        )


def capture_block_inputs(
    model: nn.Module,
    input_ids: Tensor,
    device: torch.device | str,
    sink: Callable[[Tensor], None] | None = None,
) -> tuple[list[Tensor], dict[str, Any]]:
    """Inputs of decoder block 0, recorded from the model's own forward, one sample at a time.

    Only the modules outside the blocks and the LM head are moved to ``device`` (and back
    afterwards): they are all a forward needs before block 0, and they are small, while the
    blocks may not fit on the device all at once. The forward stops at block 0, so the blocks'
    weights are never used here.

    Args:
        model: causal LM in eval mode.
        input_ids: (n, seq) int64 token windows.
        device: where the embedding-side forward runs.
        sink: if given, called with each sample's (1, seq, hidden_size) CPU tensor instead of
            collecting them (e.g. to write them into an activation store that spills to disk,
            so that the whole set is never held as a list); ``hidden`` is then empty.
    Returns:
        ``(hidden, kwargs)``: ``hidden`` is a list of n tensors (1, seq, hidden_size) on the CPU
        (calibration sets can be larger than device memory); ``kwargs`` are block 0's keyword
        arguments for the first sample (attention mask, position ids, rotary (cos, sin), ...),
        also on the CPU, identical for every window of the same length, with the KV cache
        dropped and ``use_cache`` False. Pass them to ``run_block`` after ``move_kwargs``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: expected (n, seq)")
    if model.training:
        log.warning("capturing block inputs with the model in training mode: call model.eval()")
    device = torch.device(device)
    blocks = decoder_layers(model)
    _warn_mixed_attention(model, input_ids.shape[1])
    hidden: list[Tensor] = []
    kwargs: dict[str, Any] = {}
    with _moved(_embedding_side(model, blocks), device), torch.no_grad():
        for i in range(input_ids.shape[0]):
            args, call_kwargs = _first_block_call(model, blocks[0], input_ids[i : i + 1].to(device))
            states, call_kwargs = _as_kwargs(blocks[0], args, call_kwargs)
            if sink is None:
                hidden.append(states.detach().to("cpu"))
            else:
                sink(states.detach().to("cpu"))
            if i == 0:
                kwargs = call_kwargs
    for key in _CACHE_KWARGS:
        kwargs.pop(key, None)
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, move_kwargs(kwargs, "cpu")


def run_block(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """Apply one decoder block, without gradients.

    Args:
        block: decoder block.
        hidden: (1, seq, hidden_size) input hidden states, on the block's device.
        kwargs: block keyword arguments from ``capture_block_inputs``, on the block's device.
    Returns:
        (1, seq, hidden_size) output hidden states.
    """
    with torch.no_grad():
        return block_output(block, hidden, kwargs)


def block_output(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """:func:`run_block` with gradients as the caller sets them (the Fisher pass's backward).

    transformers 5 blocks return a tensor, older and some other blocks a tuple whose first
    element is the hidden states.
    """
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
