"""``appmult explore``: search for approximate multipliers cheaper than the built-in families."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..flows.explore_config import NetworkExploreConfig
from ._config import add_option, field_default

#: ``NetworkExploreConfig`` fields the network-aware options fill; their options default to
#: None so that one given without ``--model`` can be refused (it would do nothing).
_NETWORK_FIELDS = ("dataset", "target_accuracy", "max_drop", "pretrain_epochs", "epochs", "grad", "shortlist",
                   "family_shortlist", "neighbours")


def register(sub) -> None:
    p = sub.add_parser(
        "explore", help="search for approximate multipliers: family sweep + gate-level evolution",
        description="Start from a circuit (the exact multiplier by default, any spec, a circuit file or your "
                    "Verilog), evolve it gate by gate under a sweep of error bounds (every candidate simulated "
                    "exhaustively up to 12-bit operands), and write the Pareto front: each circuit as a "
                    "netlist:path=... multiplier (JSON) with its Verilog, front.md/front.json with figures "
                    "measured after re-synthesis, and pareto.png against the built-in families' front.")
    p.add_argument("start", nargs="?", metavar="START",
                   help="seed circuit: a spec (exact:width=8), a circuit file (.json) or Verilog (.v); "
                        "default: the exact multiplier of --width and --signed")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--width", type=int, help="operand width of the default seed (both operands)")
    p.add_argument("--width-a", type=int, help="width of operand a of the default seed")
    p.add_argument("--width-b", type=int, help="width of operand b of the default seed")
    sign = p.add_mutually_exclusive_group()
    sign.add_argument("--signed", action="store_true", default=None, help="two's complement (default seed, Verilog)")
    sign.add_argument("--unsigned", dest="signed", action="store_false", help="unsigned (Verilog seed)")
    p.add_argument("--error", default="mae", help="error objective: mae, mre, wce, mse, er (default mae)")
    p.add_argument("--cost", default="transistors",
                   help="cost figure: transistors, gates, aig_nodes, depth (default transistors)")
    p.add_argument("--bounds", metavar="B1,B2,...",
                   help="increasing error bounds (%% for mae/wce of 2**(wa+wb), %% for mre/er; absolute for mse), "
                        "or 'family': one bound at each family-front point (for mae those with 0.01-1%%), so "
                        "that each bound has a family circuit to beat")
    for metric in ("mae", "wce", "mre", "er", "mse"):
        p.add_argument(f"--max-{metric}", type=float, metavar="X",
                       help=f"constraint: every reported circuit has {metric} <= X (units as --bounds)")
    p.add_argument("--budget", metavar="TIME", help="wall-clock budget, e.g. 90s, 10m, 1h")
    p.add_argument("--evaluations", type=int, metavar="N", help="candidate evaluations (reproducible budget)")
    p.add_argument("--lam", type=int, default=4, help="children per generation (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--hist", metavar="FILE.npz",
                   help="operand distributions: arrays p_a and/or p_b (one weight per code) for weighted errors")
    p.add_argument("--report", type=int, default=30, metavar="N",
                   help="measure and report at most N found circuits (default 30)")
    p.add_argument("--no-sweep", action="store_true", help="skip the family sweep")
    p.add_argument("--family-starts", action="store_true",
                   help="also start each bound from the family front: the fittest of the previous bound's "
                        "circuit and the family members under that bound")
    p.add_argument("--greedy-starts", action="store_true",
                   help="first walk from the seed by greedy approximate logic synthesis (constant and wire "
                        "substitutions, the most cost saved per unit of error; seconds for 8x8) and start "
                        "each bound from that walk's circuits too; they join the reported front")
    net = p.add_argument_group("network-aware mode (--model): histograms from a trained network, retraining")
    net.add_argument("--model", help="network (mlp, lenet5, resnet8, ...): search under its operand "
                                     "distributions, retrain a shortlist, verify the chosen circuit's RTL")
    def net_opt(name: str, *flags: str, **kwargs) -> None:
        add_option(net, NetworkExploreConfig, name, *flags, **kwargs).default = None
    net_opt("dataset", "--dataset", help="data set (digits, mnist5k, ...; default %(default)s)")
    net_opt("target_accuracy", "--target-accuracy", type=float, metavar="PCT",
            help="accuracy (%%) after retraining the chosen circuit must reach "
                 "(default: --max-drop below the exact-quantized or retrained-exact accuracy)")
    net_opt("max_drop", "--max-drop", type=float, metavar="PP",
            help="allowed loss against the better of the exact-quantized accuracy and the exact "
                 "multiplier retrained the same way, percentage points (default %(default)s)")
    net_opt("pretrain_epochs", "--pretrain-epochs", type=int, metavar="N",
            help="FP32 pretraining epochs (cached; default %(default)s)")
    net_opt("epochs", "--epochs", type=int, metavar="N", help="retraining epochs per shortlisted circuit (default %(default)s)")
    net_opt("grad", "--grad", help="retraining gradients: ste, lut2d, lut1d (default %(default)s)")
    net_opt("shortlist", "--shortlist", type=int, metavar="N",
            help="at most N found circuits retrained, bisecting along the found front for the "
                 "cheapest that meets the target (default %(default)s)")
    net_opt("family_shortlist", "--family-shortlist", type=int, metavar="N",
            help="the same along the family front (default %(default)s)")
    net_opt("neighbours", "--neighbours", type=int, metavar="N",
            help="then retrain up to N more circuits of each front, the nearest cheaper ones where its "
                 "bisection stopped (default %(default)s; 0: trust the bisection)")
    net.add_argument("--no-verify", action="store_true", help="skip the RTL check of the chosen circuit")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in DIR (its checkpoint, tables, plot and circuits/cNNN files); "
                        "without it, or --resume, a run found there is refused")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _bounds(text: str | None):
    from ..errors import UsageError
    if text is None or text == "family":
        return None  # "family": set from the sweep (run)
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--bounds must be comma-separated numbers (no empty item), not {text!r}") from None


def _hist(path: str | None):
    if path is None:
        return None, None
    import numpy as np

    from ..errors import MissingFileError, UsageError
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MissingFileError(f"Histogram file {path!r} does not exist") from None
    except (ValueError, EOFError):
        raise UsageError(f"Cannot read histogram file {path!r}: it is not a numpy .npz file") from None
    except OSError as exc:
        raise UsageError(f"Cannot read histogram file {path!r}: {exc.strerror or exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"Histogram file {path!r} holds a single array; save p_a and/or p_b with numpy.savez")
    pa = tuple(data["p_a"].tolist()) if "p_a" in data else None
    pb = tuple(data["p_b"].tolist()) if "p_b" in data else None
    if pa is None and pb is None:
        raise UsageError(f"Histogram file {path!r} has neither p_a nor p_b")
    return pa, pb


def build_config(args: argparse.Namespace):
    """The :class:`~appmult.explore.ExploreConfig` of the command-line arguments."""
    from ..explore import ExploreConfig, parse_budget
    p_a, p_b = _hist(args.hist)
    constraints = tuple((m, getattr(args, f"max_{m}")) for m in ("mae", "wce", "mre", "er", "mse")
                        if getattr(args, f"max_{m}") is not None)
    return ExploreConfig(error=args.error, cost=args.cost, bounds=_bounds(args.bounds), constraints=constraints,
                         evaluations=args.evaluations,
                         budget_s=parse_budget(args.budget) if args.budget is not None else None,
                         lam=args.lam, seed=args.seed, p_a=p_a, p_b=p_b)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..explore import (Evaluator, family_bounds, search, search_starts, seed_genome, sweep_families,
                           write_outputs)
    config = build_config(args)  # every argument checked before the long work
    _check_output(args)
    if args.model is not None:
        return _run_network(args, config)
    network_only = [_flag(name) for name in _NETWORK_FIELDS if getattr(args, name) is not None]
    if args.no_verify:
        network_only.append("--no-verify")
    if network_only:
        many = len(network_only) > 1
        raise UsageError(f"{', '.join(network_only)} only appl{'y' if many else 'ies'} to the network-aware mode: "
                         f"add --model or drop {'them' if many else 'it'}")
    if args.report < 1:
        raise UsageError(f"--report must be at least 1, not {args.report}")
    start = args.start
    widths = (args.width, args.width_a, args.width_b)
    if args.width is not None and (args.width_a is not None or args.width_b is not None):
        raise UsageError("Give --width or --width-a/--width-b, not both")
    if start is not None and any(w is not None for w in widths):
        raise UsageError("--width, --width-a and --width-b set the default seed's widths; the seed circuit "
                         f"{start!r} has its own: drop them")
    if start is None:
        wa = args.width_a if args.width_a is not None else args.width
        wb = args.width_b if args.width_b is not None else args.width
        if wa is None or wb is None:
            raise UsageError("Give a seed circuit (START) or --width (or --width-a and --width-b)")
        start = f"exact:width_a={wa},width_b={wb},signed={'true' if args.signed else 'false'}"
    genome, seed_name = seed_genome(start, signed=args.signed)
    config.check_widths(genome.width_a, genome.width_b)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    family = None
    if not args.no_sweep:
        ev = Evaluator(genome.width_a, genome.width_b, genome.signed, p_a=config.p_a, p_b=config.p_b,
                       samples=config.samples, seed=config.seed)
        family = sweep_families(genome.width_a, genome.width_b, genome.signed, evaluator=ev,
                                progress=not args.quiet)
    if args.family_starts and family is None:
        raise UsageError("--family-starts needs the family sweep (drop --no-sweep)")
    if args.bounds == "family":
        if family is None:
            raise UsageError("--bounds family needs the family sweep (drop --no-sweep)")
        bounds = family_bounds(family, config)
        if not bounds:
            raise UsageError(f"The family front has no {config.error} values in the comparison range; give --bounds")
        config = dataclasses.replace(config, bounds=bounds)
        print(f"bounds at the family front: {', '.join(f'{b:.4g}' for b in bounds)}", file=sys.stderr)
    starts, trajectory = search_starts(genome, config, family=family, family_starts=args.family_starts,
                                       greedy=args.greedy_starts, progress=not args.quiet)
    if trajectory:
        last = trajectory[-1]
        print(f"greedy walk: {len(trajectory)} steps, down to {last.cost['transistors']} transistors estimated "
              f"at {config.error} {last.evaluation.get(config.error):.4g}", file=sys.stderr)
    print(f"searching from {seed_name} ({genome.n_gates} gates, {genome.cost()['transistors']} transistors "
          f"estimated) ...", file=sys.stderr)
    _clear_run(args)
    result = search(genome, config, starts=starts, checkpoint=out / "checkpoint.json", resume=args.resume,
                    progress=not args.quiet).merged(trajectory)
    vectors = None
    if not result.exhaustive:
        ev = Evaluator(genome.width_a, genome.width_b, genome.signed, samples=config.samples, seed=config.seed)
        vectors = ev.vectors()
    doc = write_outputs(result, out, family=family, vectors=vectors, max_report=args.report,
                        progress=not args.quiet, seed_name=seed_name)
    key = doc["error_key"]
    print(f"{result.evaluations} evaluations in {result.seconds:.1f} s ({result.throughput:.0f}/s), "
          f"{'exhaustive' if result.exhaustive else 'sampled (not exhaustive)'}")
    for r in doc["found"]:
        if r["pareto"]:
            print(f"  {r['name']}  {key} {r['metrics'][key]:.4g}  transistors {r['cost']['transistors']}  "
                  f"{r['spec']}")
    for name in ("front.md", "front.json", "pareto.png", "circuits/"):
        print(f"wrote {out / name}", file=sys.stderr)
    return 0


def network_values(args: argparse.Namespace) -> dict:
    """The network-aware options as given, the config's defaults where they were not."""
    return {name: getattr(args, name) if getattr(args, name) is not None else field_default(NetworkExploreConfig, name)
            for name in _NETWORK_FIELDS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Files by which an output directory holds an explore run (plain or network-aware).
_RUN_FILES = ("checkpoint.json", "front.json", "network.json", "search/checkpoint.json")


def _check_output(args: argparse.Namespace) -> None:
    """Refuse to write over a run already in ``--output`` unless ``--resume`` or
    ``--overwrite`` says so (the old run is cleared by :func:`_clear_run` once every other
    argument has passed its checks)."""
    from ..errors import UsageError
    from ..files import check_output_dir
    out = check_output_dir(args.output)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in the output directory, --overwrite replaces it: give one")
    if args.resume and args.model is not None:
        raise UsageError("--resume is not available with --model (the network-aware mode runs from the start)")
    if args.resume:
        from ..explore.search import read_checkpoint
        read_checkpoint(out / "checkpoint.json")  # a missing or damaged one refused before the long work
    held = [name for name in _RUN_FILES if (out / name).is_file()]
    if held and not (args.resume or args.overwrite):
        how = "--overwrite to replace it" if args.model is not None else "--resume to continue it or --overwrite " \
                                                                          "to replace it"
        raise UsageError(f"Output directory {out} already holds an explore run ({held[0]}); pass {how}")


def _clear_run(args: argparse.Namespace) -> None:
    """With ``--overwrite``, drop the old run's own files from ``--output``: its checkpoint and
    tables and its circuits (``circuits/cNNN.json``/``.v``: a smaller new front would leave
    stale ones behind, not in its table); nothing else."""
    import re
    from pathlib import Path
    if not args.overwrite:
        return
    out = Path(args.output)
    for sub in (out / "circuits", out / "search" / "circuits"):
        if sub.is_dir():
            for f in sub.iterdir():
                if re.fullmatch(r"c\d{3,}\.(json|v)", f.name) and f.is_file():
                    f.unlink()
    for name in _RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()


def _run_network(args: argparse.Namespace, config) -> int:
    """``--model``: the network-aware mode (:func:`appmult.flows.explore.run_network_explore`)."""
    from ..errors import UsageError
    from ..flows.explore import run_network_explore
    if args.start is not None or args.width_a is not None or args.width_b is not None or args.signed:
        raise UsageError("--model searches from the exact unsigned multiplier of --width; "
                         "drop START, --width-a/--width-b and --signed")
    if args.hist is not None:
        raise UsageError("--model records its own operand histograms; drop --hist")
    if args.bounds == "family":
        raise UsageError("--bounds family is not available with --model (the family front depends on the "
                         "histograms); give the bounds")
    cfg = NetworkExploreConfig(out=args.output, search=config, model=args.model,
                               width=args.width if args.width is not None else 8, seed=args.seed,
                               sweep=not args.no_sweep, family_starts=args.family_starts,
                               greedy_starts=args.greedy_starts, verify=not args.no_verify,
                               progress=not args.quiet, **network_values(args))
    _clear_run(args)
    res = run_network_explore(cfg)
    print(f"exact-quantized {res['exact_quantized_accuracy']:.2f}%, exact retrained "
          f"{res['reference']['accuracy_after']:.2f}%, target {res['threshold']:.2f}%")
    for r in res["candidates"]:
        print(f"  {r['name']:<28} {r['kind']:<6} {res['error_key']} {r['error']:.4g}  transistors "
              f"{r['transistors']:>5}  accuracy {r['accuracy_before']:.2f} -> {r['accuracy_after']:.2f}%")
    chosen, ver = res["chosen"], res["verification"]
    if chosen is None:
        print("no shortlisted circuit reached the target")
        return 1
    print(f"chosen: {chosen['name']} ({chosen['spec']})" + (f"; RTL {ver['status']}" if ver else ""))
    return 1 if ver is not None and ver["status"] == "FAILED" else 0
