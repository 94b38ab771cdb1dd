"""CPU inference through torch.compile (`bsmamba2.cpu_compile`): the compiled block against the eager one, the
policy that decides when to compile, the fallback when compiling fails, and the Separator's use of it."""

import logging

import pytest
import torch

from bsmamba2 import cpu_compile
from bsmamba2.build import build_model
from bsmamba2.config import BSMamba2Config, Mamba2Config
from bsmamba2.mamba2 import BiMamba2Block
from bsmamba2.separate import Separator

CPU = torch.device("cpu")


@pytest.fixture
def fresh_compile_state(monkeypatch):
    """Each test starts with no compiled function and no recorded failure (the module keeps them per process)."""
    monkeypatch.setattr(cpu_compile, "_compiled", None)
    monkeypatch.setattr(cpu_compile, "_failed", False)


def test_policy_compiles_long_cpu_inputs_only(monkeypatch):
    monkeypatch.setattr(cpu_compile, "compiler_found", lambda: True)
    long, short = cpu_compile.AUTO_MIN_SECONDS, cpu_compile.AUTO_MIN_SECONDS - 1
    assert cpu_compile.wanted("auto", CPU, long)
    assert not cpu_compile.wanted("auto", CPU, short)
    assert not cpu_compile.wanted("auto", CPU, None)  # length unknown: not worth the risk of a slower short run
    assert cpu_compile.wanted("on", CPU, 1.0)
    assert not cpu_compile.wanted("off", CPU, 3600.0)
    assert not cpu_compile.wanted("on", torch.device("cuda"), 3600.0)  # GPUs run the Triton path
    monkeypatch.setattr(cpu_compile, "compiler_found", lambda: False)
    assert not cpu_compile.wanted("auto", CPU, 3600.0)
    with pytest.raises(ValueError, match="auto"):
        cpu_compile.wanted("yes", CPU, 1.0)


def test_compiler_found_follows_cxx(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not cpu_compile.compiler_found()
    fake = tmp_path / "my-cxx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert cpu_compile.compiler_found()


def test_compiled_block_is_one_graph():
    """Dynamo traces the whole plain block as one graph: a graph break (e.g. a call it cannot trace, such as
    `torch.backends.mkldnn.is_available` in the conv's choice) would split every mixer into separately compiled
    pieces, each with its guard checks, and stop Inductor fusing across the split."""
    torch._dynamo.reset()
    cfg = Mamba2Config(d_state=16, headdim=8, expand=2, chunk_size=16)
    block = BiMamba2Block(16, cfg).eval()
    with torch.inference_mode():
        explained = torch._dynamo.explain(cpu_compile._plain_block)(block, torch.randn(2, 37, 16))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.skipif(not cpu_compile.compiler_found(), reason="needs a C++ compiler for Inductor")
@pytest.mark.parametrize("bf16, tol", [(False, 1e-5), (True, 1e-3)])  # bf16: the CPU's bf16 projections
def test_compiled_block_matches_eager_block(fresh_compile_state, bf16, tol):
    from bsmamba2.quantize import linear_bf16  # noqa: PLC0415

    cfg = Mamba2Config(d_state=16, headdim=8, expand=2, chunk_size=16)
    precision = linear_bf16 if bf16 else (lambda blk: blk)
    block = precision(BiMamba2Block(16, cfg).eval())
    other = precision(BiMamba2Block(16, cfg).eval())  # a second block reuses the compiled function with its weights
    with torch.inference_mode():
        for blk in (block, other):
            x = torch.randn(3, 37, 16)
            ref = blk._plain(x)
            with cpu_compile.enabled():
                y = blk(x)
            assert not cpu_compile._failed
            assert ((y - ref).norm() / ref.norm()).item() < tol


def test_failed_compile_falls_back_to_eager_once(fresh_compile_state, monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    block = BiMamba2Block(16, Mamba2Config(d_state=16, headdim=8, expand=2)).eval()
    x = torch.randn(2, 20, 16)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="bsmamba2.cpu_compile"):
        ref = block._plain(x)
        with cpu_compile.enabled():
            y1 = block(x)
            y2 = block(x)
    assert torch.equal(y1, ref) and torch.equal(y2, ref)
    assert len(calls) == 1  # the failure is remembered: no second attempt
    assert "no working C++ compiler" in caplog.text and "--compile off" in caplog.text
    assert not cpu_compile.active()


@pytest.mark.parametrize("mode, seconds, precision, compiled", [
    ("auto", 61.0, None, True), ("auto", 5.0, None, False), ("off", 61.0, None, False), ("on", 5.0, None, True),
    ("auto", 61.0, "bf16", False), ("on", 5.0, "bf16", True),  # bf16 projections run faster eager, unless asked
])
def test_separator_compiles_by_mode_and_length(fresh_compile_state, monkeypatch, mode, seconds, precision, compiled):
    seen = []

    def spy(block, x):  # records the compiled route, runs the eager block (the compiled one is tested above)
        seen.append(tuple(x.shape))
        return block._plain(x)

    monkeypatch.setattr(cpu_compile, "compiler_found", lambda: True)
    monkeypatch.setattr(cpu_compile, "run_block", spy)
    model = build_model(BSMamba2Config.tiny()).eval()
    sep = Separator(model, device="cpu", compile=mode, segment=4.0, precision=precision)
    wave = 0.1 * torch.randn(2, int(seconds * 44100))
    out = sep.separate(wave, 44100)
    assert out["vocals"].shape == wave.shape
    assert bool(seen) == compiled
    assert not cpu_compile.active()  # the switch is off again outside the model calls


def test_separator_rejects_unknown_compile_mode():
    with pytest.raises(ValueError, match="compile mode"):
        Separator(build_model(BSMamba2Config.tiny()), device="cpu", compile="fast")


def test_compiled_slices_share_one_shape_whatever_the_batch(fresh_compile_state, monkeypatch):
    """Under compile every slice of an axis has one shape (the last one padded), so a new batch size never compiles
    again; the padding's rows are dropped and the result equals the eager block's."""
    seen = []

    def spy(block, x):
        seen.append(tuple(x.shape))
        return block._plain(x)

    monkeypatch.setattr(cpu_compile, "run_block", spy)
    block = BiMamba2Block(16, Mamba2Config(d_state=16, headdim=8, expand=2, chunk_size=16)).eval()
    length = 20
    monkeypatch.setattr("bsmamba2.mamba2.CPU_SLICE_ELEMENTS", 4 * length * block.forward_blocks[0].mixer.conv_dim)
    with torch.inference_mode():
        for sequences in (4, 9, 13):  # a multiple of the step of 4 sequences, and two remainders
            x = torch.randn(sequences, length, 16)
            out = torch.empty(sequences, length, 16)
            with cpu_compile.enabled():
                y = block(x)
                block(x, out=out)
            ref = block._plain(x)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert set(seen) == {(4, length, 16)}
