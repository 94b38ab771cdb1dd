"""Tensors derived from parameters (stacked or merged weights), cached between inference calls.

The grouped band layers stack their per-band weights and the fast bidirectional block merges its projections on
every forward, so that gradients reach each parameter. Without autograd the result only changes when a parameter
does: `derived` keeps it, keyed by each source's storage and version counter, which in-place changes made through
PyTorch's single-tensor ops (`add_`, `copy_`, `load_state_dict`) bump, and by the number of optimizer steps taken in
this process. Two kinds of change bypass the version counter: writes through `.data`, and the multi-tensor
`torch._foreach_*` kernels on CUDA (on the CPU they loop over single-tensor ops and do bump it). Optimizer steps, fused
or foreach, are counted by a post-step hook on every `torch.optim.Optimizer`; an EMA's lerp bumps its tensors with
`torch.autograd.graph.increment_version` (`train.EMA.update`); after any other such change, `clear(module)` drops a
module tree's cached values. `in_autocast_dtype` keeps their casts to the autocast dtype the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

T = TypeVar("T")
_ATTR = "_derived_cache"
_optimizer_steps = 0  # optimizer steps taken in this process: part of every cache key


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def derived(owner: nn.Module, name: str, sources: Sequence[Tensor], build: Callable[[], T]) -> T:
    """`build()`; without autograd, its value from an earlier call while every tensor in `sources` is unchanged."""
    if torch.is_grad_enabled():
        return build()
    # the device as well as the address: addresses repeat across devices
    key = (_optimizer_steps, *((t.device, t.data_ptr(), t._version, t.dtype) for t in sources))
    cache = owner.__dict__.setdefault(_ATTR, {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    cache[name] = (key, value)
    return value


def in_autocast_dtype(owner: nn.Module, name: str, sources: Sequence[Tensor], tensors: Sequence[Tensor],
                      device_type: str) -> tuple[Tensor, ...]:
    """`tensors` as the next autocast op would cast them: in the autocast dtype while autocast is on for
    `device_type`, else unchanged. Without autograd the cast is kept with `derived` (keyed like `tensors`' sources),
    so cached float32 weights are not cast again on every call."""
    if not torch.is_autocast_enabled(device_type):
        return tuple(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return derived(owner, f"{name}/{dtype}", sources, lambda: tuple(t.to(dtype) for t in tensors))


def clear(module: nn.Module) -> None:
    """Drop the cached derived tensors of `module` and its submodules."""
    for m in module.modules():
        m.__dict__.pop(_ATTR, None)
