"""The table of attention backends (fachat.kernels.dispatch): the order "auto" tries them in on each device type,
a backend asked for that cannot run, the environment switches, a fourth backend that needs no edit elsewhere, a
broken install, and lazy imports. No GPU is needed: only a device's type matters to the choice, and the backend
modules are stand-ins here (tests/test_kernels.py and the backends' own tests run the real ones)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest
import torch

import fachat
from fachat.engine.runner import cuda_graphs_reason
from fachat.kernels import common, dispatch, reference
from fachat.kernels.dispatch import BACKEND_ENV, BACKENDS, METAL_EMULATE_ENV, PREFERENCE, Backend, choose_backend
from test_cli import fa_chat

METAL_ENV = BACKENDS["metal"].switch
F16, F32 = torch.float16, torch.float32
CUDA, MPS, CPU = torch.device("cuda"), torch.device("mps"), torch.device("cpu")


def stand_in(name: str, **attributes) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture(autouse=True)
def table(monkeypatch):
    """No backend chosen by the environment; triton installed, run compiled (not interpreted), and Metal
    compiled by torch, with stand-ins for their modules."""
    for name in (BACKEND_ENV, METAL_ENV, METAL_EMULATE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "_installed", lambda package: True)
    monkeypatch.setattr(torch.mps, "compile_shader", lambda source: None, raising=False)
    for name, attributes in (("triton", dict(INTERPRET=False)), ("metal", {})):
        monkeypatch.setitem(sys.modules, BACKENDS[name].module, stand_in(BACKENDS[name].module, **attributes))


@pytest.mark.parametrize("device,expected", [(CUDA, "triton"), (MPS, "metal"), (CPU, "reference"),
                                             (torch.device("meta"), "reference")])
def test_auto_takes_the_first_choice_of_the_device_type(device, expected):
    assert choose_backend(device, F16, 128) == (expected, f"the default on {device.type}")


@pytest.mark.parametrize("device,name", [(CUDA, "triton"), (MPS, "metal")])
@pytest.mark.parametrize("dtype,head_dim,why", [
    (F16, 32, "head_dim 32 is not one of (64, 128, 256)"),
    (torch.float64, 64, "dtype torch.float64 is not float16, bfloat16 or float32"),
])
def test_auto_passes_over_kernels_without_the_shape_and_says_why(device, name, dtype, head_dim, why):
    assert choose_backend(device, dtype, head_dim) == ("reference", f"{name}: {why}")


def test_auto_falls_back_where_triton_or_metal_are_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "_installed", lambda package: package != "triton")
    monkeypatch.delattr(torch.mps, "compile_shader")
    assert choose_backend(CUDA, F16, 64) == ("reference", "triton: triton is not installed (pip install triton)")
    assert choose_backend(MPS, F16, 64) == (
        "reference", f"metal: torch {torch.__version__} has no torch.mps.compile_shader (PyTorch >= 2.7)")


@pytest.mark.parametrize("name,device,why", [
    ("triton", MPS, "device mps is neither CUDA nor CPU"),
    ("triton", CPU, "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1"),
    ("metal", CUDA, "device cuda is neither MPS nor CPU"),
    ("metal", CPU, f"CPU tensors need the Metal emulation: set {METAL_EMULATE_ENV}=1"),
])
def test_a_backend_asked_for_that_cannot_run_is_an_error_that_says_why(name, device, why, monkeypatch):
    with pytest.raises(ValueError, match=f"attention backend '{name}' cannot run here: {why}.*asked for"):
        choose_backend(device, F32, 64, backend=name)
    monkeypatch.setenv(BACKEND_ENV, name)
    with pytest.raises(ValueError, match=f"{why}.*{BACKEND_ENV}={name}"):
        choose_backend(device, F32, 64)


def test_the_cpu_runs_triton_interpreted_and_metal_emulated_when_asked(monkeypatch):
    monkeypatch.setattr(sys.modules[BACKENDS["triton"].module], "INTERPRET", True)
    monkeypatch.setenv(METAL_EMULATE_ENV, "1")
    assert choose_backend(CPU, F32, 64, backend="triton") == ("triton", "asked for")
    assert choose_backend(CPU, F32, 64, backend="metal") == ("metal", "asked for")
    assert choose_backend(CPU, F32, 64) == ("reference", "the default on cpu")  # only when asked


def test_fachat_metal_turns_metal_off_or_on(monkeypatch):
    monkeypatch.setenv(METAL_ENV, "0")
    assert choose_backend(MPS, F16, 128) == ("reference", f"metal: {METAL_ENV}=0")
    with pytest.raises(ValueError, match=f"cannot run here: {METAL_ENV}=0"):
        choose_backend(MPS, F16, 128, backend="metal")
    monkeypatch.setenv(METAL_ENV, "1")
    assert choose_backend(MPS, F16, 128) == ("metal", f"{METAL_ENV}=1")
    with pytest.raises(ValueError, match=f"head_dim 96 is not one of .*{METAL_ENV}=1"):
        choose_backend(MPS, F16, 96)
    with pytest.raises(ValueError, match=f"set {METAL_EMULATE_ENV}=1 .{METAL_ENV}=1"):
        choose_backend(CPU, F32, 64)
    monkeypatch.setenv(METAL_EMULATE_ENV, "1")
    assert choose_backend(CPU, F32, 64) == ("metal", f"{METAL_ENV}=1")
    # A backend named by the argument or FACHAT_ATTENTION_BACKEND comes first.
    assert choose_backend(MPS, F16, 128, backend="reference") == ("reference", "asked for")
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert choose_backend(MPS, F16, 128) == ("reference", f"{BACKEND_ENV}=reference")


@pytest.mark.parametrize("value,error", [("1", r"attention backend 'metal' cannot run here: .+ \(FACHAT_METAL=1\)"),
                                         ("on", "FACHAT_METAL must be 0 or 1 .or unset., got 'on'")])
def test_fa_chat_says_why_metal_cannot_run(value, error, tiny_dir, monkeypatch):
    monkeypatch.setenv(METAL_ENV, value)
    result = fa_chat("--model", str(tiny_dir), "--prompt", "hi", "--max-tokens", "2", "--verbose")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(error, result.stderr), result.stderr


@pytest.mark.parametrize("env", [METAL_ENV, METAL_EMULATE_ENV])
@pytest.mark.parametrize("value", ["2", "yes", "true", " 1", "on"])
def test_a_bad_switch_value_is_an_error_naming_it(env, value, monkeypatch):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=f"{env} must be 0 or 1 .or unset., got '{value}'"):
        choose_backend(MPS, F16, 64)


def test_an_unknown_backend_names_the_ones_there_are(monkeypatch):
    with pytest.raises(ValueError, match="backend 'cudnn' is not available; choose from: auto, reference, triton, "
                                         "metal"):
        choose_backend(CUDA, F16, 64, backend="cudnn")
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="'bogus' is not available"):
        choose_backend(CPU, F32, 64)


def test_a_fourth_backend_joins_by_its_table_entry_alone(monkeypatch, tiny_dir):
    """Registered in BACKENDS and PREFERENCE only: auto picks it, passes over it with its reason, names it among
    the choices, and the public attention calls, the engine and the runner all run it."""
    calls = []

    def decode_attention(*args, **kwargs):
        calls.append("decode")
        return reference.decode_attention(*args, **kwargs)

    module = stand_in("fake_attention", **{**vars(reference), "decode_attention": decode_attention})
    monkeypatch.setitem(sys.modules, "fake_attention", module)
    fits = lambda device, dtype, head_dim: None if head_dim % 16 == 0 else "head_dim not a multiple of 16"  # noqa: E731
    monkeypatch.setitem(BACKENDS, "fake", Backend("fake", "fake_attention", fits, cuda_graphs=True))
    monkeypatch.setitem(PREFERENCE, "cpu", ("fake", "reference"))
    assert choose_backend(CPU, F32, 24) == ("reference", "fake: head_dim not a multiple of 16")
    with pytest.raises(ValueError, match="choose from: auto, reference, triton, metal, fake"):
        choose_backend(CPU, F32, 64, backend="nope")
    assert cuda_graphs_reason(CUDA, "fake") == (True, "CUDA, fake attention")

    q, k, v = torch.randn(1, 2, 32), torch.randn(1, 1, 8, 32), torch.randn(1, 1, 8, 32)
    assert torch.equal(fachat.decode_attention(q, k, v, 5), reference.decode_attention(q, k, v, 5))
    assert calls == ["decode"]
    engine = fachat.Engine.load(tiny_dir, device="cpu")
    assert (engine.attention_backend, engine.attention_backend_reason) == ("fake", "the default on cpu")
    assert engine.model.attn is module
    calls.clear()
    engine.generate("hi", max_new_tokens=3, temperature=0)
    assert calls, "the engine's decode steps did not go through the chosen backend"


@pytest.mark.parametrize("name,device", [("triton", CUDA), ("metal", MPS)])
def test_a_backend_that_does_not_import_is_a_broken_install_not_a_fallback(name, device, monkeypatch):
    monkeypatch.setitem(sys.modules, BACKENDS[name].module, None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match=f"fa-chat's {name} attention backend does not import"):
        choose_backend(device, F16, 64)
    assert choose_backend(device, F16, 32) == ("reference", f"{name}: head_dim 32 is not one of (64, 128, 256)")


def test_fachat_imports_no_backend_it_does_not_run():
    """In a fresh interpreter: importing fachat, and choosing the backend for the CPU or for what the kernels do
    not cover, imports neither triton nor the metal module."""
    script = textwrap.dedent("""
        import sys, torch, fachat
        from fachat.kernels.dispatch import choose_backend
        choose_backend('cpu', torch.float32, 64)
        choose_backend('cuda', torch.float64, 64)
        choose_backend('mps', torch.float16, 80)
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith(
            ('fachat.kernels.triton', 'fachat.kernels.metal'))))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACHAT_", "TRITON_"))}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


def test_partitions_give_every_partition_a_tile_in_one_wave(gen, seed):
    """common.partitions, for any device and tile: every partition gets a whole tile, the programs fit one wave,
    and a span with more tiles than partitions has its longest run of tiles as short as the budget allows."""
    for _ in range(500):
        span, rows, units = (int(torch.randint(1, n, (1,), generator=gen)) for n in (200_000, 64, 200))
        tile, budget, width = (int(torch.randint(1, n, (1,), generator=gen)) for n in (256, 8, 256))
        n = common.partitions(span, rows, units, tile, budget, width)
        whole = span // tile
        msg = f"span={span} rows={rows} units={units} tile={tile} budget={budget} width={width} -> {n}; seed={seed}"
        assert 1 <= n <= max(1, whole), msg  # a whole tile each: no empty partition
        assert n == 1 or n * rows <= max(2, budget) * units, msg  # one wave
        if n < whole:  # some partitions take several tiles: their longest run is as short as the budget allows
            most = max(1, budget * units // rows)  # allows, with no partition to spare
            assert -(-whole // n) == -(-whole // most), msg
            assert n == 1 or -(-whole // (n - 1)) > -(-whole // n), msg
        if whole * rows <= 2 * units and whole <= width:
            assert n == max(1, whole), msg  # short: a partition per tile
