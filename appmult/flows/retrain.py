"""The retraining workflow behind ``appmult retrain``: FP32 -> quantized -> approximate -> retrained.

Pipeline (:func:`run_retrain`), one step function each:

0. Before any work: the output directory can be written and holds no earlier run, unless
   this one resumes it (``resume``) or replaces it (``overwrite``) (:func:`_check_output`).
1. The LUT: loaded, or characterized from a spec; with ``verify_rtl``, everything the RTL
   check will need is checked here, before any training (:func:`_resolve_lut`).
2. An FP32 model: pretrained and cached (:func:`appmult.train.pretrain_fp32`) or
   loaded from a checkpoint (:func:`_fp32_step`).
3. Quantize (weight scales per channel or per tensor; every layer through the LUT, or only
   the convolutions with ``approximate="conv"``) and calibrate once against the LUT --
   on a few batches in eval mode, or (``calibration="epoch"``, as published) over one
   epoch of un-augmented training data in train mode without backward, which also sets
   BatchNorm statistics: this is the *starting point* every
   gradient mode retrains from (same weights, same activation ranges). Evaluate it with
   exact products (same quantization: the "exact-quantized" reference) and with the
   approximate multiplier ("approx before") (:func:`_starting_point`).
4. The LUT-2D/LUT-1D tables per mode: the LUT file's stored tables by default; an
   explicit ``H``; or ``"auto"``, the published procedure -- a short training trial per
   ``H`` in 1, 2, 4, ... (while ``2H+1`` fits the operand range), keeping the ``H`` with
   the lowest training loss afterwards; the trials are recorded in ``results.json``
   (:func:`_mode_tables`, :mod:`appmult.flows.half_window`).
5. Retrain once per mode -- ``ste``, ``lut2d``, ``lut1d`` backward (Meng et al.) and,
   optionally, ``simulated-error`` (Hammad et al.: exact products plus per-product noise
   of the LUT's MRE in training, see :mod:`appmult.methods.simulated_error`) -- each from the same start,
   with the same seeds and batch order; optional hybrid schedule (exact products, same
   quantization, for the last ``exact_last`` epochs) (:func:`_retrain_mode`,
   :mod:`appmult.flows.retrain_mode`). Evaluate each result on the approximate multiplier
   and with exact products.
6. Optionally (``verify_rtl``) the hardware proof per mode: the retrained model's first
   approximate conv layer (the first linear one in a model without convolutions), fed a
   few real test images, has its integer accumulators recomputed by the RTL MAC unit of
   the LUT's circuit in a simulator (:func:`appmult.flows.verify_layer_rtl`); the
   outcome is recorded per mode, and ``appmult retrain`` exits non-zero on a mismatch
   (:func:`_rtl_step`).
7. Write ``results.json``, ``results.md`` and ``curves.png`` (:mod:`appmult.flows.retrain_results`);
   ``results.json["protocol"]`` records every setting of the protocol (quantization, which
   layers are approximate, calibration, augmentation, schedule, half window) and which of
   them were given explicitly over the recipe (``RetrainConfig.recipe``, e.g. ``"date25"``).

Every epoch is checkpointed atomically per mode (``<out>/modes/<mode>/last.pt``); with
``resume=True`` an interrupted run continues where it stopped -- also after its directory
was moved or copied -- and ends with the same numbers as an uninterrupted one. Under
``torchrun`` (``WORLD_SIZE > 1``) the same call trains with DistributedDataParallel
(:mod:`appmult.flows.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidTypeError, UserError
from ..files import check_output_dir
from ..hdl import from_spec
from ..lut_gen import LutFile
from ..methods.simulated_error import lut_mre
from ..nn import (ApproxConv2d, ApproxLinear, attention_modules, calibrate, cpu_threads, exact_, exact_multiplication,
                  load_lut)
from ..tb import check_simulator
from ..train import Loaders, Metrics, evaluate, make_loaders, train_epoch
from . import rtlcheck
from .characterization import characterize
from .distributed import Dist, init_distributed, run_device, shard_loaders
from .half_window import half_window_candidates, half_window_trials, stored_half_window, with_half_window
from .retrain_config import SIMULATED_ERROR_MODE, RetrainConfig, RetrainError
from .retrain_mode import (MODES_DIR, EpochHook, check_resume_settings, existing_run, mode_identity, remove_modes,
                           train_mode)
from .retrain_results import RESULT_FILES, RESULTS_FORMAT, lut_summary, remove_results, versions, write_results
from .retrain_start import Conversion, approx_model, calibrate_epoch, fixed_batches, fp32_model, reseed, start_state

__all__ = ["run_retrain", "state_digest"]

#: Test images fed to the model for the RTL check.
RTL_IMAGES = 4


def run_retrain(cfg: RetrainConfig, *, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Run the whole retraining workflow (see the module docstring) and write its results.

    Args:
        cfg: the run's configuration.
        on_epoch_end: called as ``on_epoch_end(mode, epoch, record)`` after every epoch's
            checkpoint; raising from it interrupts the run (resume later with
            ``resume=True``), returning True stops that mode early.

    Returns:
        The results dict, as written to ``<out>/results.json`` (on every rank).

    Raises:
        RetrainError: mismatched checkpoint or output directory, an earlier run in the
            output directory (without ``resume`` or ``overwrite``), an impossible RTL
            check, or invalid settings.
        appmult.errors.UsageError: an output directory that cannot be written.
        FileNotFoundError: a missing LUT file or checkpoint.
        appmult.lut_gen.LutFileError: an invalid LUT file.
        appmult.train.CheckpointError: a corrupt checkpoint in the output directory.
    """
    if not isinstance(cfg, RetrainConfig):
        raise InvalidTypeError(f"run_retrain needs a RetrainConfig, not {type(cfg).__name__}")
    d = init_distributed()
    try:
        with cpu_threads(cfg.threads):
            return _pipeline(_Run(cfg, d, run_device(d)), on_epoch_end)
    finally:
        if d.owned:
            torch.distributed.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every step of one run shares: its configuration, its process, its device."""

    cfg: RetrainConfig
    dist: Dist
    device: torch.device

    def say(self, msg: str) -> None:
        """A stage message on stderr (rank 0, with ``progress``)."""
        if self.cfg.progress and self.dist.main:
            print(f"[retrain] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class _Start:
    """The starting point every mode shares, and its two reference evaluations."""

    state: dict[str, torch.Tensor]  # weights and activation ranges, no LUT buffers
    calib: list[tuple[torch.Tensor, torch.Tensor]]  # fixed un-augmented training batches (CPU): calibration, probe
    exact_quantized: Metrics  # exact products, same quantization
    approx_before: Metrics  # the approximate multiplier, before retraining
    calibration: dict[str, Any]  # how the activation ranges were set


@dataclasses.dataclass(frozen=True)
class _Tables:
    """The LUT one mode retrains with, and the half window of its LUT-2D/LUT-1D tables."""

    lut: LutFile
    half_window: int | None


def _pipeline(run: _Run, on_epoch_end: EpochHook | None) -> dict[str, Any]:
    """The steps of the module docstring, in order; the results dict."""
    t_start = time.perf_counter()
    cfg, d = run.cfg, run.dist
    _check_output(run)
    lut = _resolve_lut(run)
    full_loaders = make_loaders(cfg.dataset, cfg.batch_size, cfg.seed, cfg.data_dir, augment=cfg.augment)
    loaders = shard_loaders(full_loaders, d, cfg.batch_size)
    plain_train = _plain_train_loader(full_loaders.train, cfg)
    fp32, fp32_info = _fp32_step(run, full_loaders, loaders.test)
    start_model, start = _starting_point(run, fp32, lut, plain_train, loaders.test)
    layers = _layer_kinds(start_model, lut)
    tables, trials = _mode_tables(run, fp32, lut, start, full_loaders, plain_train)
    exact_epoch_s = _time_exact_epoch(start_model, loaders, cfg, run.device) if cfg.time_exact else None
    del start_model

    if cfg.overwrite and d.main:
        # Only now, when this run is about to write: a run that fails before keeps the old one.
        remove_modes(Path(cfg.out))
        remove_results(Path(cfg.out))
    d.barrier()
    modes: dict[str, Any] = {}
    for mode in cfg.modes:
        model, modes[mode] = _retrain_mode(run, mode, tables[mode], fp32, fp32_info, start, loaders,
                                           on_epoch_end)
        if cfg.verify_rtl:
            modes[mode]["rtl_check"] = _rtl_step(run, mode, model, loaders.test)

    results = _results(run, lut, fp32_info, start, trials, modes, exact_epoch_s)
    results["protocol"] = _protocol(run, lut, layers, start, tables)
    results["timing"]["total_s"] = time.perf_counter() - t_start
    if d.main:
        out = Path(cfg.out)
        write_results(out, results)
        run.say(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    d.barrier()
    return results


# --- steps ---------------------------------------------------------------------------------------

def _check_output(run: _Run) -> None:
    """Before any work: ``out`` can be written, holds no run this one would destroy, and a
    resumed run's settings are the run's own (:func:`check_resume_settings`).

    Rank 0 looks (the others would race its first writes) and every rank raises what it found.
    """
    cfg, d = run.cfg, run.dist
    problem: UserError | None = None
    if d.main:
        try:
            out = check_output_dir(cfg.out, files=RESULT_FILES)
            if cfg.resume:
                check_resume_settings(cfg)
            elif not cfg.overwrite:
                found = existing_run(out, finished=(out / RESULT_FILES[0]).is_file()) if out.is_dir() else None
                if found:
                    raise RetrainError(f"Output directory {out} already holds a retraining run ({found}): pass "
                                       f"--resume to continue it, --overwrite to replace it, or choose another --out")
        except UserError as exc:
            problem = exc
    problem = d.share(problem)
    if problem is not None:
        raise problem


def _resolve_lut(run: _Run) -> LutFile:
    """The LUT file, or the spec characterized with every gradient table; refuses an impossible RTL check."""
    cfg = run.cfg
    if cfg.lut is not None:
        lut = load_lut(cfg.lut)
    else:
        lut = characterize(cfg.spec, gradients=("ste", "lut2d", "lut1d"), progress=cfg.progress,
                           cost=False).to_lutfile()
    if cfg.recipe == "date25" and lut.signed:
        raise RetrainError(f"Recipe date25 quantizes unsigned asymmetric, for unsigned multipliers; LUT "
                           f"{lut.lut_id} is signed. Run without --recipe (signed symmetric quantization), "
                           f"or give an unsigned multiplier")
    if cfg.verify_rtl:
        _check_rtl_possible(cfg, lut)
    run.say(f"LUT {lut.lut_id} ({lut.metadata.get('spec') or 'custom'}), "
            f"{lut.width_a}x{lut.width_b} {'signed' if lut.signed else 'unsigned'}")
    return lut


def _fp32_step(run: _Run, full_loaders: Loaders, test: Iterable) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 model on the run's device, and where it came from and its test accuracy."""
    fp32, fp32_info = fp32_model(run.cfg, full_loaders, run.dist)
    fp32 = fp32.to(run.device)
    fp32_info["sha256"] = state_digest(fp32)  # what a resumed run must start from, wherever its file is
    fp32_info["accuracy"] = evaluate(fp32, test, device=run.device).accuracy
    run.say(f"FP32 {run.cfg.model}: {100 * fp32_info['accuracy']:.2f}% ({fp32_info['source']})")
    return fp32, fp32_info


def _plain_train_loader(train: Any, cfg: RetrainConfig) -> Any:
    """The training data without augmentation, shuffled by ``cfg.seed`` (calibration, probe batches)."""
    if cfg.augment == "none":
        return train
    return torch.utils.data.DataLoader(train.dataset.with_augment("none"), batch_size=cfg.batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(cfg.seed))


def _calibrated(run: _Run, fp32: nn.Module, lut: LutFile, plain_train: Iterable,
                calib: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[nn.Module, dict[str, Any]]:
    """``fp32`` quantized for ``lut`` (STE) and calibrated as the run asks; how it was calibrated."""
    cfg, device = run.cfg, run.device
    model = approx_model(fp32, lut, "ste", device, Conversion.of(cfg))
    if cfg.calibration == "epoch":
        n = calibrate_epoch(model, plain_train, device)
        return model, {"method": "epoch", "batches": n, "mode": "train", "augmented": False,
                       "batchnorm_updated": True}
    calibrate(model, [(x.to(device), y) for x, y in calib])
    return model, {"method": "batches", "batches": len(calib), "mode": "eval", "augmented": False,
                   "batchnorm_updated": False}


def _starting_point(run: _Run, fp32: nn.Module, lut: LutFile, plain_train: Iterable,
                    test: Iterable) -> tuple[nn.Module, _Start]:
    """Quantize and calibrate once; evaluate exact and approximate."""
    cfg, device = run.cfg, run.device
    calib = fixed_batches(plain_train, cfg.calib_batches, cfg.seed)
    start_model, calibration = _calibrated(run, fp32, lut, plain_train, calib)
    state = start_state(start_model)
    top5 = _top5(cfg)
    reference = start_model
    if cfg.calibration == "epoch":
        # Calibrated in train mode, the BatchNorm statistics follow the multiplier's outputs; the
        # exact-quantized reference gets its own calibration epoch with exact products.
        reference = approx_model(fp32, lut, "ste", device, Conversion.of(cfg))
        with exact_multiplication(reference):
            calibrate_epoch(reference, plain_train, device)
    with exact_multiplication(reference):
        exact_q = evaluate(reference, test, device=device, top5=top5)
    del reference
    approx_before = evaluate(start_model, test, device=device, top5=top5)
    run.say(f"exact-quantized {100 * exact_q.accuracy:.2f}%, approximate before retraining "
            f"{100 * approx_before.accuracy:.2f}%")
    return start_model, _Start(state, calib, exact_q, approx_before, calibration)


def _top5(cfg: RetrainConfig) -> bool:
    """Whether top-5 accuracy is measured too (CIFAR-100)."""
    return cfg.dataset == "cifar100"


def _mode_tables(run: _Run, fp32: nn.Module, lut: LutFile, start: _Start, full_loaders: Loaders,
                 plain_train: Iterable) -> tuple[dict[str, _Tables], dict[str, Any]]:
    """Per mode, which tables (half window) to retrain with; the half-window trials, if any."""
    cfg, d, device = run.cfg, run.dist, run.device
    train = full_loaders.train
    tables = {m: _Tables(lut, None) for m in cfg.modes}
    trials: dict[str, Any] = {}
    trial_fp32, trial_state = fp32, start.state
    if cfg.half_window == "auto" and cfg.trial_model != cfg.model and any(g in cfg.grads for g in ("lut2d", "lut1d")):
        # The trials' own network (Meng et al.: a LeNet), pretrained and quantized like the run's.
        trial_fp32, _ = fp32_model(cfg, full_loaders, d, model_name=cfg.trial_model)
        trial_fp32 = trial_fp32.to(device)
        trial_state = start_state(_calibrated(run, trial_fp32, lut, plain_train, start.calib)[0])
    for g in ("lut2d", "lut1d"):
        if g not in cfg.grads:
            continue
        if cfg.half_window is None:
            tables[g] = _Tables(lut, stored_half_window(lut, g) if g in lut.gradients else None)
            continue
        h = cfg.half_window
        if h == "auto":
            result = None
            if d.main:
                run.say(f"half-window trials for {g}: H in {half_window_candidates(lut)}")
                result = half_window_trials(trial_fp32, lut, g, trial_state, train,
                                            [(x.to(device), y.to(device)) for x, y in start.calib], lr=cfg.lr,
                                            seed=cfg.seed, trial_batches=cfg.trial_batches, device=device,
                                            epochs=cfg.trial_epochs, conversion=Conversion.of(cfg),
                                            model_name=cfg.trial_model)
            trials[g] = result = d.share(result)
            h = result["chosen"]
            run.say(f"{g}: chose H={h} " + ", ".join(f"H={t['half_window']}: {t['train_loss_after']:.4f}"
                                                     for t in result["trials"]))
        tables[g] = _Tables(with_half_window(lut, h), h)
    return tables, trials


def _time_exact_epoch(start_model: nn.Module, loaders: Loaders, cfg: RetrainConfig, device) -> float:
    """Seconds of one training epoch plus evaluation with exact products (same quantization)."""
    model = copy.deepcopy(start_model)
    exact_(model, True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    reseed(cfg.seed, loaders.train)
    t0 = time.perf_counter()
    train_epoch(model, loaders.train, opt, device=device, desc="exact-quantized timing")
    evaluate(model, loaders.test, device=device)
    return time.perf_counter() - t0


def _retrain_mode(run: _Run, mode: str, tables: _Tables, fp32: nn.Module, fp32_info: dict[str, Any],
                  start: _Start, loaders: Loaders,
                  on_epoch_end: EpochHook | None) -> tuple[nn.Module, dict[str, Any]]:
    """Retrain one mode from the start and evaluate it both ways: the model and its results entry."""
    cfg, device = run.cfg, run.device
    run.say(f"retraining: {mode} ({cfg.epochs} epochs"
            + (f", exact products in the last {cfg.exact_last}" if cfg.exact_last else "") + ")")
    identity = mode_identity(cfg, mode, tables.lut, fp32_info, tables.half_window)
    model, history, start_acc = train_mode(cfg, run.dist, mode, fp32, tables.lut, start.state, loaders, device,
                                           identity, on_epoch_end)
    top5 = _top5(cfg)
    approx_after = evaluate(model, loaders.test, device=device, top5=top5)
    with exact_multiplication(model):
        exact_after = evaluate(model, loaders.test, device=device, top5=top5)
    approx_times = [r["epoch_time_s"] for r in history if r.get("train_multiplication") != "exact"]
    simulated = mode == SIMULATED_ERROR_MODE
    return model, {
        "grad": "ste" if simulated else mode,
        "simulated_error": ({"mre": cfg.mre if cfg.mre is not None else lut_mre(tables.lut),
                             "distribution": "uniform", "method": "auto", "operands": cfg.noise_operands}
                            if simulated else None),
        "half_window": tables.half_window, "lut_id": tables.lut.lut_id,
        "approx_start": start_acc, "state_sha256": state_digest(model),
        "approx_after": approx_after.accuracy, "approx_after_loss": approx_after.loss,
        "exact_after": exact_after.accuracy, "exact_after_loss": exact_after.loss,
        "approx_after_top5": approx_after.top5, "exact_after_top5": exact_after.top5,
        "epoch_time_s": float(np.mean(approx_times)) if approx_times else None,
        "history": history,
        "rtl_check": None,
    }


def _results(run: _Run, lut: LutFile, fp32_info: dict[str, Any], start: _Start, trials: dict[str, Any],
             modes: dict[str, Any], exact_epoch_s: float | None) -> dict[str, Any]:
    """The results dict (``total_s`` still None)."""
    cfg, d = run.cfg, run.dist
    return {
        "format": RESULTS_FORMAT,
        "config": dataclasses.asdict(cfg),
        "lut": lut_summary(lut),
        "fp32": fp32_info,
        "start": {"exact_quantized_accuracy": start.exact_quantized.accuracy,
                  "exact_quantized_loss": start.exact_quantized.loss,
                  "approx_accuracy": start.approx_before.accuracy, "approx_loss": start.approx_before.loss,
                  "exact_quantized_top5": start.exact_quantized.top5, "approx_top5": start.approx_before.top5,
                  "calib_batches": start.calibration["batches"], "calibration": start.calibration},
        "half_window_trials": trials,
        "modes": modes,
        "timing": {"exact_quantized_epoch_s": exact_epoch_s, "fp32_epoch_s": fp32_info.get("epoch_time_s"),
                   "total_s": None},
        "seeds": {"seed": cfg.seed, "epoch_seeds": "numpy SeedSequence([seed, epoch]) per epoch "
                                                   "(appmult.train.fit)"},
        "distributed": {"world_size": d.world, "backend": (torch.distributed.get_backend()
                                                           if d.world > 1 else None)},
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


def _layer_kinds(model: nn.Module, lut: LutFile) -> dict[str, list[str]]:
    """Names of the layers that multiply through ``lut`` and of those quantized but exact;
    ``attention``: the attention modules whose QK^T and AV products go through ``lut``."""
    out: dict[str, list[str]] = {"approximate": [], "quantized_exact": [], "weight_schemes": [], "attention": []}
    schemes = set()
    for name, m in model.named_modules():
        if isinstance(m, (ApproxConv2d, ApproxLinear)):
            out["approximate" if m.lut.sha256 == lut.sha256 else "quantized_exact"].append(name)
            schemes.add(m.weight_quant.scheme.value)
    out["weight_schemes"] = sorted(schemes)  # as the layers hold them
    out["attention"] = [name for name, m in attention_modules(model) if m.lut.sha256 == lut.sha256]
    return out


def _protocol(run: _Run, lut: LutFile, layers: dict[str, list[str]], start: _Start,
              tables: dict[str, _Tables]) -> dict[str, Any]:
    """What the run did, setting by setting: the recipe, the fields given explicitly, and every setting."""
    cfg = run.cfg
    scheme = "signed symmetric" if lut.signed else "unsigned asymmetric"
    return {
        "recipe": cfg.recipe,
        "given": {name: getattr(cfg, name) for name in cfg.given},
        "quantization": {"activations": f"{scheme} per-tensor",
                         "weights": f"{scheme} {cfg.weight_scheme.replace('_', '-')}",
                         "weight_scheme": cfg.weight_scheme,
                         "bits": {"activations": lut.width_a, "weights": lut.width_b}, "signed": lut.signed,
                         "zero_point_terms": None if lut.signed else "exact"},
        "approximate": {"setting": cfg.approximate, **layers},
        "calibration": start.calibration,
        "augmentation": cfg.augment,
        "schedule": {"optimizer": "adam", "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                     "batch_size": cfg.batch_size, "epochs": cfg.epochs, "milestones": list(cfg.milestones),
                     "gamma": 0.5, "test_every_epoch": True},
        "half_window": {"setting": "stored" if cfg.half_window is None else cfg.half_window,
                        "trial_model": cfg.trial_model, "trial_epochs": cfg.trial_epochs,
                        "chosen": {m: t.half_window for m, t in tables.items() if m in ("lut2d", "lut1d")}},
        "metrics": ["top1", "top5"] if _top5(cfg) else ["top1"],
    }


def state_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state_dict tensors (names, dtypes, shapes, bytes), in key order.

    Two processes hold the same trained model exactly when their digests agree (used to
    check that DDP ranks end identical).
    """
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- the hardware proof --------------------------------------------------------------------------

def _check_rtl_possible(cfg: RetrainConfig, lut: LutFile) -> None:
    """Refuse ``verify_rtl`` before any training when it cannot work.

    What :func:`_rtl_step` will need: a circuit behind the LUT (a spec in its metadata that
    names one, of the LUT's widths and signedness) and a working simulator.
    """
    spec = lut.metadata.get("spec")
    if not spec:
        raise RetrainError(f"--verify-rtl needs a LUT characterized from a circuit; LUT {lut.lut_id} has no "
                           f"'spec' in its metadata")
    try:
        mult = from_spec(spec)
    except (UserError, ValueError, TypeError) as exc:
        raise RetrainError(f"--verify-rtl needs the circuit of LUT {lut.lut_id}, but its metadata spec {spec!r} "
                           f"does not name one: {exc}") from None
    differ = rtlcheck.kind_mismatch(mult, lut)
    if differ:
        raise RetrainError(f"--verify-rtl needs the circuit of LUT {lut.lut_id}: its spec {spec} is {differ[0]} "
                           f"but the LUT is {differ[1]}")
    check_simulator(cfg.rtl_sim)


def _first_approx_layer(model: nn.Module) -> tuple[str, nn.Module]:
    named = list(model.named_modules())
    for kind in (ApproxConv2d, ApproxLinear):
        for name, m in named:
            if isinstance(m, kind):
                return name, m
    raise RetrainError("The model has no approximate layer to check in RTL")


@torch.no_grad()
def _layer_input(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``model`` (eval mode) sees ``images``."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


def _rtl_step(run: _Run, mode: str, model: nn.Module, test_loader: Iterable) -> dict[str, Any]:
    """:func:`~appmult.flows.verify_layer_rtl` on the first approximate layer (rank 0), as a results dict."""
    cfg = run.cfg
    result = None
    if run.dist.main:
        name, layer = _first_approx_layer(model)
        images = next(iter(test_loader))[0][:RTL_IMAGES].to(run.device)
        x = _layer_input(model, layer, images)
        check = rtlcheck.verify_layer_rtl(layer, x, positions=cfg.rtl_positions, sim=cfg.rtl_sim,
                                          build_dir=Path(cfg.out) / MODES_DIR / mode / "rtl", seed=cfg.seed)
        result = dict(check.to_dict(), layer_name=name, images=int(images.shape[0]))
        run.say(f"{mode}: {result['summary']}")
    return run.dist.share(result)
