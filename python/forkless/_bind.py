"""Binding a torch ``nn.Module`` to a generation's tensors, without a copy."""

from ._core import BindError, generation as _current_generation


def _torch_dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def bind_problems(module, generation, prefix="", strict=True):
    """What keeps ``bind(module, generation, prefix, strict)`` from working: one line per
    missing, extra (strict) or mismatched tensor, naming it with both shapes or dtypes. Empty
    when the module fits."""
    state = module.state_dict(keep_vars=True)
    available = {t.name[len(prefix):]: t for t in generation.tensors() if t.name.startswith(prefix)}
    problems = []
    for name, tensor in state.items():
        have = available.get(name)
        shape, dtype = list(tensor.shape), _torch_dtype_name(tensor.dtype)
        if have is None:
            problems.append(f"{prefix}{name}: the module has {dtype} {shape}; generation {generation.number} has "
                            f"no such tensor")
        elif tuple(shape) != tuple(have.shape) or dtype != have.dtype:
            problems.append(f"{prefix}{name}: the module has {dtype} {shape}, generation {generation.number} has "
                            f"{have.dtype} {list(have.shape)}")
    if strict:
        for name in sorted(set(available) - set(state)):
            have = available[name]
            problems.append(f"{prefix}{name}: generation {generation.number} has {have.dtype} {list(have.shape)}, "
                            f"the module has no such parameter or buffer (strict=False ignores it)")
    return problems


def bind(module, generation=None, prefix="", strict=True):
    """Makes ``module``'s parameters and persistent buffers the generation's tensors, by
    ``state_dict`` name (``prefix`` + name in the generation), without copying: zero-copy views
    of the shared, read-only weights, on the CPU or on ``cuda:N``. Parameters become
    ``nn.Parameter(..., requires_grad=False)``; tied parameters stay tied.

    Checks everything first, so a mismatch leaves the module as it was: BindError names every
    missing, extra (``strict``) or mismatched tensor with both shapes and dtypes.

    Build the module on the meta device (``with torch.device("meta"): ...``) to skip allocating
    weights it would throw away. Buffers that are not persistent stay where the module made them.
    Returns the module.
    """
    import torch

    generation = generation if generation is not None else _current_generation()
    problems = bind_problems(module, generation, prefix, strict)
    if problems:
        raise BindError(f"cannot bind {type(module).__name__} to generation {generation.number} ({generation.source}):"
                        "\n  " + "\n  ".join(problems))
    state = module.state_dict(keep_vars=True)
    made = {}  # id(old tensor) -> new, so that tied parameters stay one
    for name, old in state.items():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        new = made.get(id(old))
        if new is None:
            data = generation.torch(prefix + name)
            new = torch.nn.Parameter(data, requires_grad=False) if isinstance(old, torch.nn.Parameter) else data
            made[id(old)] = new
        setattr(owner, attr, new)
    return module
