"""What the pipeline, the checkpoint and the save need to work on a lazily loaded model.

With a :class:`baq.model.lazy.LazyLoader` only one decoder block is real at a time, so nothing may
keep
a model-sized tensor: calibration activations live in an
:class:`~baq.run.activations.ActivationStore`
(spilled to disk beyond a budget), solver results are kept compact (codes, grid, levels; no
float weight, which is recomputed bit for bit when needed), and the tensors of released blocks
that a fingerprint or a save needs are read back from the checkpoint, a block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from baq.model import blocks
from baq.quant.gptq import QuantResult
from baq.quant.grid import Grid, dequantize
from baq.quant.rotation import original_basis
from baq.run.activations import ActivationStore

if TYPE_CHECKING:
    from baq.model.lazy import LazyLoader


def capture_inputs(
    model: nn.Module, calib_ids: Tensor, device: torch.device, max_bytes: int | None
) -> tuple[ActivationStore, dict[str, Any]]:
    """Block 0's inputs for every calibration window, written into a store as they come.

    The store is made on the first sample (its row shape and dtype are only known then), so
    spilled inputs never sit in memory as a list. ``max_bytes`` is the store's RAM budget
    (None: unlimited, the store is then a plain tensor in RAM).

    Returns:
        ``(store, kwargs)`` as :func:`baq.model.blocks.capture_block_inputs` returns them.
    """
    store: ActivationStore | None = None

    def sink(states: Tensor) -> None:
        nonlocal store
        if store is None:
            shape = (calib_ids.shape[0], *states.shape[1:])
            store = ActivationStore(shape, states.dtype, max_bytes)
        store.append(states)

    try:
        _, kwargs = blocks.capture_block_inputs(model, calib_ids, device, sink=sink)
    except BaseException:
        if store is not None:
            store.close()
        raise
    assert store is not None and store.filled == len(store)
    return store, kwargs


def open_block(
    model: nn.Module, i: int, device: torch.device, loader: LazyLoader | None
) -> tuple[nn.Module, torch.device | None]:
    """Decoder block ``i`` on ``device``: read from disk with a loader, else moved there.

    Returns:
        ``(block, home)``: ``home`` is where :func:`close_block` puts it back (None: released).
    """
    if loader is not None:
        return loader.load_block(i, device), None
    block = blocks.decoder_layers(model)[i]
    home = next(block.parameters()).device
    return block.to(device), home


def close_block(
    model: nn.Module, i: int, home: torch.device | None, loader: LazyLoader | None
) -> None:
    """Undo :func:`open_block`: release the block (lazy) or move it back to ``home``."""
    if loader is not None:
        loader.release_block(i)  # also gives the freed heap back (trim_heap)
    else:
        blocks.decoder_layers(model)[i].to(home)


def compact(res: QuantResult) -> QuantResult:
    """A result on the CPU without its float weight, codes in the smallest integer type.

    Keeps codes (uint8 when every column has at most 256 levels, else int32), grid, levels and
    losses: about one byte per weight instead of the eight that weight plus int32 codes take,
    which would add up to the size of the model. :func:`weight_of` recomputes the weight.
    """
    g = res.grid
    codes_dtype = torch.uint8 if int(res.levels.max()) <= 256 else torch.int32
    return replace(
        res,
        weight=None,
        codes=res.codes.to("cpu", codes_dtype),
        grid=Grid(g.lo.cpu(), g.hi.cpu(), g.group_size, g.sym, g.dim),
        levels=res.levels.cpu(),
        losses=res.losses.cpu(),
    )


def weight_of(res: QuantResult) -> Tensor:
    """The (rows, cols) float32 dequantized weight of a result, compact or not.

    ``grid.dequantize`` of the codes is bitwise the solver's weight (the checkpoint restores
    weights the same way and resumed runs are byte-identical); a rotated layer's is taken back
    to the original basis as the solver's was (``rotation.original_basis``).
    """
    if res.weight is not None:
        return res.weight
    return original_basis(dequantize(res.codes, res.grid, res.levels), res.rotation)


def quantized_on_load(
    loader: LazyLoader, results: dict[str, QuantResult]
) -> Callable[[int, nn.Module], None]:
    """An ``on_load`` for ``loader.streaming`` that writes block ``i``'s quantized weights.

    A streamed block is read from the original checkpoint; this puts the solver's dequantized
    weights into its quantized linears before it runs, so a streamed forward is the forward of
    the quantized model.
    """

    def on_load(i: int, block: nn.Module) -> None:
        for name, mod in blocks.linears(block).items():
            res = results.get(f"{loader.prefix}{i}.{name}")
            if res is not None:
                blocks.set_weight(mod, weight_of(res))

    return on_load


def _block_of(key: str, prefix: str) -> str | None:
    return key[len(prefix) :].split(".", 1)[0] if key.startswith(prefix) else None


def state_items(model: nn.Module, loader: LazyLoader) -> Iterator[tuple[str, Tensor]]:
    """``model.state_dict().items()`` with released block tensors read from the checkpoint.

    Read one block at a time and dropped once consumed, so a digest over the whole model (the
    resume fingerprint) needs one block's memory and gives the digest a full load gives.
    """
    group: list[str] = []
    current: str | None = None
    state = model.state_dict()

    def flush() -> Iterator[tuple[str, Tensor]]:
        read = loader.read(group)
        for key in group:
            yield key, read.pop(key)

    for key, tensor in state.items():
        block = _block_of(key, loader.prefix)
        if group and (tensor.device.type != "meta" or block != current):
            yield from flush()
            group = []
        if tensor.device.type == "meta":
            group.append(key)
            current = block
        else:
            yield key, tensor
    if group:
        yield from flush()


def dense_state(model: nn.Module, skip: set[str], loader: LazyLoader) -> dict[str, Tensor]:
    """The state dict of a lazily loaded model for a save, quantized weights left out.

    Released blocks' other tensors (norms, biases, skipped linears) are read from the
    checkpoint; they were never changed, so they equal what a full load holds. Names that share
    one tensor in the model (ties) get one tensor, so the save's tie detection still sees them.
    Quantized weights still on meta are dropped: their values come from the results.
    """
    state = model.state_dict()
    objects = dict(
        chain(
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False),
        )
    )
    source: dict[str, str] = {}  # meta key -> first key holding the same tensor
    first: dict[int, str] = {}
    for key, tensor in list(state.items()):
        if tensor.device.type != "meta":
            continue
        if key in skip:
            del state[key]
            continue
        source[key] = first.setdefault(id(objects.get(key, tensor)), key)
    read = loader.read(dict.fromkeys(source.values()))
    for key, src in source.items():
        state[key] = read[src]
    return state
