"""Helpers the experiment scripts share: logging, LUTs, cached retraining runs, 95% intervals.

The scripts put ``experiments/`` on ``sys.path`` and ``import common``; nothing here is part
of the ``appmult`` package.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

#: Two-sided 95% Student t quantiles by degrees of freedom (n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_luts(work: Path, specs: dict[str, str], names) -> dict[str, Path]:
    """``name -> LUT file`` under ``work/luts``, characterized from ``specs[name]`` when missing."""
    from appmult.flows import characterize
    out = {}
    for name in names:
        path = Path(work) / "luts" / f"{name}.npz"
        if not path.exists():
            characterize(specs[name], progress=False, cost=False).save(path)
        out[name] = path
    return out


def cached_retrain(cfg) -> dict:
    """``run_retrain(cfg)``, or the results a finished earlier run left in ``cfg.out``."""
    from appmult.flows import run_retrain
    done = Path(cfg.out) / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    return run_retrain(cfg)


def summarize(res: dict) -> dict:
    """The numbers of one retraining run that the experiment tables need."""
    modes = res["modes"]
    return {
        "fp32": res["fp32"]["accuracy"],
        "exact_quantized": res["start"]["exact_quantized_accuracy"],
        "approx_before": res["start"]["approx_accuracy"],
        "after": {m: modes[m]["approx_after"] for m in modes},
        # the last epoch's training loss (what the gradient estimator optimizes; steadier
        # than the test accuracy of BatchNorm models) and the test accuracy after every epoch
        "train_loss": {m: modes[m]["history"][-1]["train_loss"] for m in modes},
        "test_curve": {m: [h["test_accuracy"] for h in modes[m]["history"]] for m in modes},
        "epoch_s": {m: modes[m]["epoch_time_s"] for m in modes},
        "half_window": {m: modes[m]["half_window"] for m in modes},
        "mre": res["lut"]["metrics"]["mre"],
        "total_s": res["timing"]["total_s"],
        "protocol": {k: res["protocol"][k] for k in ("quantization", "schedule", "half_window")},
        "approximate_layers": res["protocol"]["approximate"]["approximate"],
    }


def ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half width of its 95% Student-t interval (0 for a single value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def pct(xs: list[float]) -> str:
    """``mean ± half width`` of fractions, in percent (percentage points for differences)."""
    m, h = ci95([100 * x for x in xs])
    return f"{m:.1f} ± {h:.1f}" if len(xs) > 1 else f"{m:.1f}"


def loss_cells(summaries: list[dict], grads=("ste", "lut2d", "lut1d")) -> list[str]:
    """Table cells: final training loss per mode, the paired differences of the other modes
    to the first (STE), and the min-max test accuracy (%) over every seed's last two epochs."""
    def fl(xs: list[float]) -> str:
        m, h = ci95(xs)
        return f"{m:.3f} ± {h:.3f}"
    tl = {g: [x["train_loss"][g] for x in summaries] for g in grads}
    cells = [fl(tl[g]) for g in grads]
    cells += [fl([a - b for a, b in zip(tl[g], tl[grads[0]])]) for g in grads[1:]]
    cells.append(" / ".join(
        f"{100 * min(v for x in summaries for v in x['test_curve'][g][-2:]):.0f}-"
        f"{100 * max(v for x in summaries for v in x['test_curve'][g][-2:]):.0f}" for g in grads))
    return cells


LOSS_HEADER = ("final train loss: STE | LUT-2D | LUT-1D | LUT-2D - STE | LUT-1D - STE "
               "| test accuracy over the last two epochs, min-max: STE / LUT-2D / LUT-1D")
