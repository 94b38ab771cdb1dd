"""tools/sm90_loop_stats.py: the listing parser counts what a loop issues, and the time-axis scan compiles for
sm_90a on this machine with the real launch's specialization (no GPU needed; Triton ships ptxas, cuobjdump and
nvdisasm). The compile runs the script in a fresh process: other test modules turn on Triton's interpreter and a
16-step chunk for the whole session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R41], desc[UR48][R2.64], P5 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR40], RZ, !UPT ;
        /*0040*/                   SHFL.UP PT, R11, R88, 0x1, RZ ;
        /*0050*/                   MUFU.EX2 R11, R11 ;
        /*0060*/                   LDG.E.128 R184, desc[UR48][R16.64] ;
        /*0070*/              @P3 BRA `(.L_x_0) ;
        /*0080*/                   STG.E.128 desc[UR48][R124.64], R88 ;
        /*0090*/                   EXIT ;
"""


def test_loop_stats_counts_the_loop_body_only(tool_script):
    tool = tool_script("sm90_loop_stats")
    stats = tool.loop_stats(LISTING)
    assert stats == {"loop": True, "loop_instructions": 7, "barriers": 1, "shuffles": 1, "async_copies": 1,
                     "plain_global_loads": 1, "tensor_core": 1, "exp2": 1, "local_memory": 0}
    with pytest.raises(ValueError, match="no loop"):
        tool.loop_stats(LISTING.replace("BRA `(.L_x_0)", "EXIT"))
    # a kernel without a loop (the per-head backward) is counted whole on request
    whole = tool.loop_stats(LISTING.replace("BRA `(.L_x_0)", "EXIT"), whole=True)
    assert whole["loop"] is False and whole["loop_instructions"] == 10 and whole["tensor_core"] == 1


def test_time_scan_specialized_as_launched(tool_script, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at each launch: the capture sees compiled kernels
    tool = tool_script("sm90_loop_stats")
    kernel, args, kwargs = tool.captured_launch()
    signature, constexprs, attrs, options = tool.specialize(kernel, args, dict(kwargs))
    names = kernel.arg_names
    # unit strides became constants, as the JIT makes them on the GPU; the 801-frame length stays an argument
    assert constexprs[(names.index("sx_p"),)] == 1 and (names.index("L"),) not in constexprs
    assert signature["sx_p"] == "constexpr" and signature["L"] == "i32" and signature["x_ptr"] == "*bf16"
    assert attrs[(names.index("sx_l"),)] == [["tt.divisibility", 16]]  # 1280 channels
    assert options["num_warps"] == 4 and "num_stages" in options


def test_time_scan_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BSMAMBA2_SSD_BLOCK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_loop_stats.py"), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ships no" in run.stderr:  # a Triton package without the NVIDIA tools
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    stats = json.loads(run.stdout)
    assert stats["block_q"] == 64
    assert 0 < stats["registers"] <= 255 and stats["shared_bytes"] > 0
    assert stats["tensor_core"] >= 4 and stats["loop_instructions"] > 100  # the four products per chunk, as wgmma


@pytest.mark.parametrize("grouped", ["1", "0"])
def test_backward_chunk_kernel_specialized_as_launched(tool_script, monkeypatch, grouped):
    """`--kernel bwd` captures the chunk kernel `ssd_bwd` launches for the mixer's layout (the grouped one
    under BSMAMBA2_SSD_BWD_GROUPED=1, else the per-head one), the states kernel's launches set aside."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("BSMAMBA2_SSD_BLOCK", raising=False)
    monkeypatch.setenv("BSMAMBA2_SSD_BWD_GROUPED", grouped)
    tool = tool_script("sm90_loop_stats")
    kernel, args, kwargs = tool.captured_launch(kernel="bwd")
    assert kernel.__name__ == ("bwd_chunk_grouped_kernel" if grouped == "1" else "bwd_chunk_kernel")
    signature, constexprs, attrs, options = tool.specialize(kernel, args, dict(kwargs))
    names = kernel.arg_names
    assert constexprs[(names.index("P"),)] == 64 and constexprs[(names.index("N"),)] == 128  # positional constexprs
    assert kwargs["STATES"] and kwargs["BLOCK_Q"] == 64 and signature["dx_ptr"] == "*bf16"
    assert options["num_warps"] == (8 if grouped == "1" else 4)


def test_grouped_backward_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BSMAMBA2_SSD_BLOCK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["BSMAMBA2_SSD_BWD_GROUPED"] = "1"  # the grouped kernel (opt-in until a device run has timed it)
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_loop_stats.py"), "--kernel", "bwd-band",
                          "--json"], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ships no" in run.stderr:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    stats = json.loads(run.stdout)
    assert stats["loop"] and stats["num_warps"] == 8 and 0 < stats["registers"] <= 255
    assert stats["tensor_core"] >= 4  # the head loop's two products per head as wgmma
