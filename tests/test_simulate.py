"""QuantCache.set_quantized round-trips a module only while it runs: the numbers of a parameter swap, one module's
round trip alive at a time, the 16-bit weights in place between forwards and after an error."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama

from quantplan.analysis.formats import NF4, NF4_BS32
from quantplan.analysis.simulate import QuantCache


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))


def test_set_quantized_gives_the_numbers_of_swapped_weights():
    model = tiny_llama(layers=2).float()
    names = list(_linears(model))
    formats = {names[0]: NF4_BS32}
    cache = QuantCache(model, NF4)
    with torch.inference_mode():
        with cache.quantized(names, formats):
            swapped = model(_ids()).logits
        cache.set_quantized(names, formats)
        hooked = model(_ids()).logits
        cache.set_quantized(())
        plain = model(_ids()).logits
    assert torch.equal(hooked, swapped)
    assert not torch.equal(plain, swapped)


def test_one_round_trip_is_alive_at_a_time_and_the_weights_stay_16_bit():
    model = tiny_llama(layers=2).float()
    linears = _linears(model)
    originals = {n: m.weight.data_ptr() for n, m in linears.items()}  # .data is a new wrapper per access
    cache = QuantCache(model, NF4)
    alive = []

    def count(module, args, output):  # while a Linear returns: how many weights are not their 16-bit tensors
        alive.append(sum(m.weight.data_ptr() != originals[n] for n, m in linears.items()))

    hooks = [m.register_forward_hook(count) for m in linears.values()]  # registered first: run before swap_back
    cache.set_quantized(list(linears))
    assert all(m.weight.data_ptr() == originals[n] for n, m in linears.items())  # nothing swapped until a module runs
    with torch.inference_mode():
        model(_ids())
    for hook in hooks:
        hook.remove()
    assert alive and max(alive) == 1  # its own round trip only (a whole-variant swap would show every module)
    assert all(m.weight.data_ptr() == originals[n] for n, m in linears.items())
    cache.set_quantized(())
    assert not cache._originals and not any(m._forward_pre_hooks for m in linears.values())


def test_an_error_inside_a_forward_puts_the_16_bit_weight_back():
    model = tiny_llama(layers=2).float()
    name, module = next(iter(_linears(model).items()))
    original = module.weight.data_ptr()
    cache = QuantCache(model, NF4)
    cache.set_quantized([name])
    with pytest.raises(RuntimeError, match="shape"):
        module(torch.zeros(3, module.in_features + 1))
    assert module.weight.data_ptr() == original and not cache._originals
    with pytest.raises(RuntimeError, match="do not nest"):
        with cache.quantized([name]):
            pass
    cache.set_quantized(())
