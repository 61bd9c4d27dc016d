"""The binding without a supervisor: generations loaded from a file (`forkless.load`, the same
views a worker gets), DLPack export through numpy, read-only views, lifetimes, acceptance specs
and module binding errors (with torch when it is installed, with stand-ins otherwise).
"""

import gc
import json
import struct

import numpy as np
import pytest

import forkless
from forkless import _core
from conftest import IN, OUT, make_weights, read_safetensors


@pytest.fixture(scope="module")
def model(bins, tmp_path_factory):
    return make_weights(bins, tmp_path_factory.mktemp("binding") / "w.safetensors", 42)


def write_safetensors(path, tensors):
    """{name: (safetensors dtype, shape, raw bytes)} → a safetensors file."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def test_a_generation_lists_its_tensors(model):
    g = forkless.load(model)
    assert g.number == 0 and g.backend == "host" and g.device == "cpu"
    assert sorted(g.tensors()) == [("bias", "float32", (OUT,)), ("weight", "float32", (OUT, IN))]
    assert "weight" in g and "nope" not in g and len(g) == 2
    assert g.info("weight").shape == (OUT, IN)
    with pytest.raises(KeyError, match="nope"):
        g.tensor("nope")


def test_numpy_views_are_zero_copy_read_only_and_exact(model):
    g = forkless.load(model)
    on_disk = read_safetensors(model)
    w = g.tensor("weight")
    assert isinstance(w, np.ndarray) and w.dtype == np.float32 and w.shape == (OUT, IN)
    assert w.ctypes.data == g.dlpack("weight").data_ptr  # the mapping itself, no copy
    assert np.array_equal(w, on_disk["weight"]) and np.array_equal(g.numpy("bias"), on_disk["bias"])
    assert not w.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0] = 1.0
    with pytest.raises(ValueError):
        w.flags.writeable = True
    with pytest.raises(ValueError, match="read-only"):
        np.add(w, 1.0, out=w)


def test_dlpack_capsules_versioned_and_legacy(model):
    producer = forkless.load(model).dlpack("weight")
    assert producer.__dlpack_device__() == (1, 0)
    assert "dltensor_versioned" in repr(producer.__dlpack__(max_version=(1, 0)))
    assert "dltensor_versioned" in repr(producer.__dlpack__(max_version=(1, 3)))
    assert '"dltensor"' in repr(producer.__dlpack__())
    assert '"dltensor"' in repr(producer.__dlpack__(max_version=(0, 8)))
    assert producer.__dlpack__(dl_device=(1, 0), copy=False) is not None
    with pytest.raises(BufferError, match="copy"):
        producer.__dlpack__(copy=True)
    with pytest.raises(BufferError, match="without a copy"):
        producer.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError, match="stream"):
        producer.__dlpack__(stream=1)
    gc.collect()  # unconsumed capsules delete their tensors


def test_a_capsule_is_consumed_once(model):
    producer = forkless.load(model).dlpack("bias")

    class Once:
        capsule = producer.__dlpack__(max_version=(1, 0))

        def __dlpack__(self, **kwargs):
            return self.capsule

        def __dlpack_device__(self):
            return (1, 0)

    first = np.from_dlpack(Once())
    assert first.shape == (OUT,)
    with pytest.raises((ValueError, BufferError, RuntimeError)):
        np.from_dlpack(Once())  # renamed "used_dltensor_versioned" by numpy
    assert "used_dltensor_versioned" in repr(Once.capsule)


def test_arrays_keep_the_generation_mapped(model):
    g = forkless.load(model)
    w = g.numpy("weight")
    expected = read_safetensors(model)["weight"].copy()
    del g
    gc.collect()
    assert np.array_equal(w, expected)  # still mapped: the array holds the generation


def test_every_dtype_maps_to_numpy(tmp_path):
    values = {
        "f64": ("F64", np.arange(6, dtype="<f8").reshape(2, 3)),
        "f32": ("F32", np.linspace(-1, 1, 5, dtype="<f4")),
        "f16": ("F16", np.array([0.5, -2.0, 3.25], dtype="<f2")),
        "i64": ("I64", np.array([-(2**40), 7], dtype="<i8")),
        "i32": ("I32", np.array([-5, 5], dtype="<i4")),
        "i16": ("I16", np.array([-300, 300], dtype="<i2")),
        "i8": ("I8", np.array([-7, 7], dtype="i1")),
        "u8": ("U8", np.array([1, 255], dtype="u1")),
        "flag": ("BOOL", np.array([True, False, True])),
    }
    raw = {name: (dtype, array.shape, array.tobytes()) for name, (dtype, array) in values.items()}
    raw["bf16"] = ("BF16", (2,), np.array([0x3F80, 0xC000], dtype="<u2").tobytes())  # 1.0, -2.0
    g = forkless.load(write_safetensors(tmp_path / "dtypes.safetensors", raw))
    names = {"f64": "float64", "f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32", "i16": "int16",
             "i8": "int8", "u8": "uint8", "flag": "bool", "bf16": "bfloat16"}
    assert {t.name: t.dtype for t in g.tensors()} == names
    for name, (_, array) in values.items():
        got = g.numpy(name)
        assert got.dtype == array.dtype and np.array_equal(got, array), name
        assert not got.flags.writeable
    with pytest.raises(TypeError, match="torch"):
        g.numpy("bf16")  # numpy has no bfloat16: generation.torch() does


def test_acceptance_specs(model):
    g = forkless.load(model)
    check = _core._make_check
    assert check({"weight": ("float32", (OUT, IN)), "bias": (OUT,)})(g) is None
    assert check({"weight": (None, None)})(g) is None
    assert "no tensor 'w2'" in check({"w2": (OUT, IN)})(g)
    assert "shape [1024, 256], the service needs [1024, 512]" in check({"weight": (OUT, 512)})(g)
    assert "is float32, the service needs float16" in check({"bias": ("float16", (OUT,))})(g)
    assert check(lambda gen: None)(g) is None and check(lambda gen: True)(g) is None
    assert check(lambda gen: "too small")(g) == "too small"
    assert check(lambda gen: False)(g) == "refused by the service's check"

    def refuses(gen):
        raise forkless.Refused("generation from the wrong lab")

    assert check(refuses)(g) == "generation from the wrong lab"
    assert check([{"bias": (OUT,)}, lambda gen: "no"])(g) == "no"
    with pytest.raises(TypeError):
        check(42)


def test_a_check_sees_names_dtypes_and_shapes_not_values(model):
    g = forkless.load(model)
    c = g.candidate()
    assert isinstance(c, forkless.Candidate) and not isinstance(c, forkless.Generation)
    assert (c.number, c.backend, c.device, c.source) == (g.number, g.backend, g.device, g.source)
    assert c.tensors() == g.tensors() and c.names() == g.names() and len(c) == len(g)
    assert c.info("weight").shape == (OUT, IN) and "bias" in c and "nope" not in c
    for read in (c.tensor, c.numpy, c.torch, c.dlpack):
        with pytest.raises(TypeError, match="names, dtypes and shapes, not its values"):
            read("weight")
    # Every kind of check decides on a candidate as it does on the generation.
    check = _core._make_check
    assert check({"weight": ("float32", (OUT, IN)), "bias": (OUT,)})(c) is None
    assert "shape [1024, 256], the service needs [1024, 512]" in check({"weight": (OUT, 512)})(c)
    wrong = FakeModule({"weight": FakeTensor("float32", IN, OUT), "bias": FakeTensor("float32", OUT)})
    assert "weight: the module has float32 [256, 1024], generation 0 has" in check(wrong)(c)


def test_the_link_hook_runs_every_check_and_a_raising_check_refuses(model, monkeypatch):
    native = forkless.load(model)._native.candidate()
    monkeypatch.setattr(_core, "_checks", [])
    monkeypatch.setattr(_core, "_approved", {})
    assert _core._run_checks(native) is None  # no checks: accepted
    _core._checks.append(_core._make_check({"weight": (OUT, IN)}))
    assert _core._run_checks(native) is None and _core._approved[0] == 1

    def broken(gen):
        raise KeyError("oops")

    _core._checks.append(_core._make_check(lambda gen: "too small"))
    _core._checks.append(_core._make_check(broken))
    reason = _core._run_checks(native)
    assert reason.startswith("too small; the acceptance check ") and "raised KeyError: 'oops'" in reason, reason
    assert 0 not in _core._approved  # refused: nothing approved
    # A check may not wait on the link it runs on.
    _core._checks[:] = [_core._make_check(lambda gen: forkless.attach())]
    assert "RuntimeError: forkless.attach() cannot be called from an acceptance check" in _core._run_checks(native)


def test_checks_registered_late_run_once_on_the_generation_they_missed(model, monkeypatch):
    g = forkless.load(model)
    calls = []
    monkeypatch.setattr(_core, "_checks", [_core._make_check(lambda gen: calls.append("early"))])
    monkeypatch.setattr(_core, "_approved", {})
    assert _core._run_checks(g._native.candidate()) is None  # the link checked generation 0
    _core._checks.append(_core._make_check(lambda gen: calls.append("late")))
    assert _core._catch_up(g) == [] and _core._catch_up(g) == []
    assert calls == ["early", "late"]  # each check once
    _core._checks.append(_core._make_check({"weight": (OUT, 512)}))
    assert "the service needs [1024, 512]" in _core._catch_up(g)[0]


class FakeDtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"torch.{self.name}"


class FakeTensor:
    def __init__(self, dtype, *shape):
        self.dtype, self.shape = FakeDtype(dtype), shape


class FakeModule:
    """What bind_problems reads of an nn.Module: state_dict(keep_vars=True)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self, keep_vars=False):
        return dict(self.state)

    def named_parameters(self):
        return iter(())


def test_bind_problems_name_every_mismatch(model):
    g = forkless.load(model)
    fits = FakeModule({"weight": FakeTensor("float32", OUT, IN), "bias": FakeTensor("float32", OUT)})
    assert forkless.bind_problems(fits, g) == []
    wrong = FakeModule({"weight": FakeTensor("float32", IN, OUT), "bias": FakeTensor("float16", OUT),
                        "scale": FakeTensor("float32", 1)})
    problems = forkless.bind_problems(wrong, g)
    assert "weight: the module has float32 [256, 1024], generation 0 has float32 [1024, 256]" in problems
    assert "bias: the module has float16 [1024], generation 0 has float32 [1024]" in problems
    assert "scale: the module has float32 [1]; generation 0 has no such tensor" in problems
    partial = FakeModule({"weight": FakeTensor("float32", OUT, IN)})
    assert forkless.bind_problems(partial, g, strict=False) == []
    (extra,) = forkless.bind_problems(partial, g)
    assert extra.startswith("bias: generation 0 has float32 [1024], the module has no such")
    prefixed = FakeModule({"weight": FakeTensor("float32", OUT, IN)})
    assert "fc.weight: the module has" in forkless.bind_problems(prefixed, g, prefix="fc.")[0]
    # The acceptance check made from a module is the same check.
    assert "weight: the module has float32 [256, 1024]" in _core._make_check(wrong)(g)


def test_bind_with_torch(model):
    torch = pytest.importorskip("torch")
    g = forkless.load(model)
    with torch.device("meta"):
        layer = torch.nn.Linear(IN, OUT)
    assert forkless.bind(layer, g) is layer
    assert layer.weight.data_ptr() == g.dlpack("weight").data_ptr  # zero-copy
    assert not layer.weight.requires_grad and isinstance(layer.weight, torch.nn.Parameter)
    x = torch.linspace(-1, 1, IN)
    want = read_safetensors(model)["weight"].astype(np.float64) @ x.double().numpy() + \
        read_safetensors(model)["bias"].astype(np.float64)
    assert np.allclose(layer(x).detach().double().numpy(), want, rtol=1e-5, atol=1e-5)

    with torch.device("meta"):
        wrong = torch.nn.Linear(IN + 1, OUT)
    before = wrong.weight
    with pytest.raises(forkless.BindError, match=r"weight: the module has float32 \[1024, 257\]"):
        forkless.bind(wrong, g)
    assert wrong.weight is before  # checked before anything changed

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(IN, OUT, device="meta")
            self.b = torch.nn.Linear(IN, OUT, device="meta")
            self.b.weight = self.a.weight

    # Both names resolve to the one "weight" of the generation (prefix per submodule).
    tied = Tied()
    forkless.bind(tied.a, g)
    assert tied.a.weight.data_ptr() == g.dlpack("weight").data_ptr


def test_a_private_generation_has_no_lane_and_says_how_to_get_one(model):
    g = forkless.load(model)
    assert g.has_lane is False
    with pytest.raises(forkless.LaneError, match=r"\[lane\] enabled = true"):
        g.submit(b"x")
    with pytest.raises(ValueError, match="timeout"):
        g.submit(b"x", timeout=0)
    assert issubclass(forkless.LaneFull, forkless.LaneError)


def test_one_lane_pass_per_process_and_only_a_callable(model, monkeypatch):
    monkeypatch.setitem(_core._lane, "run", None)
    assert _core._lane_pass() is None, "no pass declared: this worker only submits"
    with pytest.raises(TypeError, match="callable"):
        forkless.lane_pass(42)

    @forkless.lane_pass
    def run(generation, inputs):
        return [bytes(reversed(data)) for data in inputs]

    assert forkless.lane_pass(run) is run, "declaring the same pass again is harmless"
    with pytest.raises(RuntimeError, match="already declared"):
        forkless.lane_pass(lambda generation, inputs: [])
    # What the runner thread calls: the native generation wrapped for the pass.
    native, seen = forkless.load(model)._native, []
    assert _core._lane_pass()(native, [b"ab"]) == [b"ba"]
    monkeypatch.setitem(_core._lane, "run", lambda generation, inputs: seen.append(generation) or [])
    _core._lane_pass()(native, [])
    assert isinstance(seen[0], forkless.Generation) and seen[0].number == 0
