"""The files a retraining run leaves: ``results.json``, ``results.md``, ``curves.png``."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_text
from ..lut_gen import LutFile
from ..train import plot_history

__all__ = ["RESULTS_FORMAT", "RESULT_FILES", "lut_summary", "remove_results", "results_markdown", "versions",
           "write_results"]

RESULTS_FORMAT = "appmult.retrain.results/1"
#: The files :func:`write_results` writes into the output directory.
RESULT_FILES = ("results.json", "results.md", "curves.png")


def lut_summary(lut: LutFile) -> dict[str, Any]:
    """What ``results.json`` records of the LUT file."""
    md = lut.metadata
    return {"id": lut.lut_id, "sha256": lut.sha256, "spec": md.get("spec") or md.get("name"),
            "family": md.get("family"), "width_a": lut.width_a, "width_b": lut.width_b,
            "signed": lut.signed, "gradients": sorted(lut.gradients), "metrics": md.get("metrics"),
            "gradient_params": md.get("gradient_params")}


def versions() -> dict[str, str]:
    """Versions of Python, torch, numpy and appmult."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        out["appmult"] = importlib.metadata.version("appmult")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        out["appmult"] = "unknown"
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """The ``results.md`` table of a results dict (one row per mode).

    Args:
        results: as returned by :func:`~appmult.flows.run_retrain`.

    Returns:
        Markdown text: a heading line and one table.
    """
    lut, start = results["lut"], results["start"]
    lines = [f"# Retraining {results['config']['model']} on {results['config']['dataset']} "
             f"with {lut['spec'] or lut['id']}", "",
             f"FP32 accuracy {_pct(results['fp32']['accuracy'])}%; LUT {lut['id']}; "
             f"{results['config']['epochs']} epochs, seed {results['config']['seed']}.", "",
             "| mode | exact-quantized acc (%) | approx before (%) | approx after (%) | exact after (%) "
             "| epoch time approx (s) | epoch time exact-quantized (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["modes"].items():
        lines.append(f"| {name} | {_pct(start['exact_quantized_accuracy'])} | {_pct(start['approx_accuracy'])} "
                     f"| {_pct(m['approx_after'])} | {_pct(m['exact_after'])} | {_secs(m['epoch_time_s'])} "
                     f"| {_secs(results['timing']['exact_quantized_epoch_s'])} |")
    rtl = [(name, m["rtl_check"]) for name, m in results["modes"].items() if m.get("rtl_check")]
    if rtl:
        lines.append("")
        for name, r in rtl:
            lines.append(f"- {name}, layer `{r['layer_name']}`: {r['summary']}")
            lines += [f"  - position ({', '.join(map(str, c['position']))}): int_forward {c['expected']}, "
                      f"RTL {c['actual']}" for c in r["checks"] if not c["matched"]]
    return "\n".join(lines) + "\n"


def remove_results(out: Path) -> None:
    """Delete the result files of an earlier run in ``out`` (``--overwrite``)."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``curves.png`` (every mode's history) in ``out``."""
    json_name, md_name, png_name = RESULT_FILES
    atomic_write_text(out / json_name, json.dumps(results, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / md_name, results_markdown(results))
    plot_history({name: m["history"] for name, m in results["modes"].items()}, out / png_name,
                 title=f"{results['config']['model']} / {results['config']['dataset']} / "
                       f"{results['lut']['spec'] or results['lut']['id']}")
