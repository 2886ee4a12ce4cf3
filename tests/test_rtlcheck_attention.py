"""One QK^T entry of approximate attention through the RTL MAC in Icarus (issue 15)."""

from __future__ import annotations

import pytest
import torch

from appmult.flows import characterize
from appmult.flows.rtlcheck_attention import verify_attention_rtl
from appmult.nn import ApproxConfig, LutAttention
from appmult.tb import simulator_available


@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
@pytest.mark.parametrize("spec", ["truncated:width=6,columns=4,signed=true", "drum:width=6,k=3"])
def test_qk_entry_rtl_equals_int_scores(spec, tmp_path):
    lut = characterize(spec, gradients=(), progress=False, cost=False).to_lutfile()
    att = LutAttention(ApproxConfig(lut))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 6), torch.randn(1, 2, 3, 6), torch.randn(1, 2, 3, 6)
    res = verify_attention_rtl(att, q, k, v, entries=[(0, 0, 0), (1, 2, 1)], lanes=4, build_dir=tmp_path)
    assert res.passed, res
    assert res.actual == res.expected


@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
def test_qk_entry_rtl_catches_another_multiplier(tmp_path):
    from appmult.hdl import from_spec
    lut = characterize("truncated:width=6,columns=4,signed=true", gradients=(), progress=False,
                       cost=False).to_lutfile()
    att = LutAttention(ApproxConfig(lut))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    res = verify_attention_rtl(att, q, k, v, entries=[(0, 0, 0), (0, 1, 2)], lanes=4, build_dir=tmp_path,
                               multiplier=from_spec("truncated:width=6,columns=0,signed=true"))
    assert not res.passed
