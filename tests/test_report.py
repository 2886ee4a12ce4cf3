"""Plot labels from spec strings."""

import pytest

from appmult.lut_gen.report import short_spec


@pytest.mark.parametrize("spec,label", [
    ("truncated:width_a=8,width_b=8,signed=false,columns=8,compensate=false", "truncated(columns=8)"),
    ("truncated:width=8,columns=8,compensate=true", "truncated(columns=8,compensate=true)"),
    ("perforated:width_a=8,width_b=8,signed=false,rows=[0,1,2]", "perforated(rows=[0,1,2])"),
    ("exact:width_a=8,width_b=8,signed=false", "exact"),
    ("mitchell:width_a=8,width_b=8,signed=true", "mitchell(signed)"),
    ("drum", "drum"),
])
def test_short_spec(spec, label):
    assert short_spec(spec) == label
