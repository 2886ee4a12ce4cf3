"""What a user does wrong, and the exact message appmult answers with (issue 11).

Each row: what the user does (a command line, built in a fresh temporary directory) and the
one-line message the ``appmult`` command must print, exit status 2, no traceback. Item numbers
refer to issue 11; rows without a number are its "messages that must name the user's problem".
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import exact
from test_trust import FALSE_4X4, exact_table, forge_lut, read_only_dir, small_lut  # noqa: F401 (fixture)

from appmult.cli import main


def _lut(tmp: Path) -> Path:
    return small_lut().save(tmp / "lut.npz")


def _with_header(tmp: Path, **change) -> Path:
    head = {"magic": "appmult-lut", "format_version": 1, "width_a": 4, "width_b": 4, "signed": False,
            "gradients": [], **change}
    head = {k: v for k, v in head.items() if v is not _DROP}
    return forge_lut(tmp / "bad.npz", exact_table(4, False), width_a=4, width_b=4, signed=False, metadata={},
                     header=head)


_DROP = object()


def lut_is_directory(tmp):
    return ["verify", "exact:width=4", "--lut", str(tmp)], f"LUT file {tmp} is a directory, not a file"


def retrain_lut_is_directory(tmp):
    return (["retrain", "--lut", str(tmp), "--out", str(tmp / "run"), "--no-progress"],
            f"LUT file {tmp} is a directory, not a file")


def lut_gradients_not_a_list(tmp):  # item 14
    p = _with_header(tmp, gradients=5)
    return (["verify", "exact:width=4", "--lut", str(p)],
            f"LUT file {p}: header field 'gradients' must be a list of method names, not 5")


def lut_metadata_is_a_list(tmp):  # item 14
    p = forge_lut(tmp / "bad.npz", exact_table(4, False), width_a=4, width_b=4, signed=False, metadata=[1, 2])
    return (["verify", "exact:width=4", "--lut", str(p)],
            f"LUT file {p}: metadata must be a JSON object, not a list")


def lut_header_without_width_a(tmp):  # item 14
    p = _with_header(tmp, width_a=_DROP)
    return (["verify", "exact:width=4", "--lut", str(p)], f"LUT file {p}: header field 'width_a' is missing")


def lut_header_is_a_list(tmp):  # item 14
    p = _with_header(tmp)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["header"] = np.frombuffer(b"[1, 2]", np.uint8)
    np.savez(p, **arrays)
    return (["verify", "exact:width=4", "--lut", str(p)], f"LUT file {p}: header must be a JSON object, not a list")


def lut_metadata_says_4x4(tmp):  # item 8
    p = forge_lut(tmp / "false.npz", exact_table(8, True), width_a=8, width_b=8, signed=True, metadata=FALSE_4X4)
    return (["verify", "exact:width=8,signed=true", "--lut", str(p)],
            f"LUT file {p}: metadata says width_a=4, width_b=4, signed=false, but the table is 8x8 signed")


def lut_with_extra_member(tmp):  # item 12
    p = _lut(tmp)
    with zipfile.ZipFile(p, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("extra.npy", b"\0" * (1 << 20))
    return (["verify", "exact:width=4", "--lut", str(p)],
            f"LUT file {p} holds an unexpected member 'extra.npy'; refusing to read it")


def export_to_directory(tmp):  # item 13
    return ["export", "exact:width=4", "-o", str(tmp)], f"Cannot write output file {tmp}: it is a directory"


def export_below_a_file(tmp):  # item 13
    (tmp / "f").write_text("")
    return (["export", "exact:width=4", "-o", str(tmp / "f" / "x.v")],
            f"Cannot write output file {tmp / 'f' / 'x.v'}: {tmp / 'f'} is a file, not a directory")


def export_read_only(tmp, ro):  # item 13
    return (["export", "exact:width=4", "-o", str(ro / "x.v")],
            f"Cannot write output file {ro / 'x.v'}: directory {ro} is not writable")


def characterize_into_a_file(tmp):  # item 13
    (tmp / "f").write_text("")
    return (["characterize", "exact:width=4", "-o", str(tmp / "f")],
            f"Cannot write output directory {tmp / 'f'}: it is a file, not a directory")


def characterize_read_only(tmp, ro):  # item 13
    return (["characterize", "exact:width=4", "-o", str(ro / "out")],
            f"Cannot write output directory {ro / 'out'}: directory {ro} is not writable")


def characterize_over_a_directory(tmp):  # item 13
    (tmp / "out" / "report.json").mkdir(parents=True)
    return (["characterize", "exact:width=4", "-o", str(tmp / "out")],
            f"Cannot write output file {tmp / 'out' / 'report.json'}: it is a directory")


def compare_into_a_file(tmp):  # item 13
    (tmp / "f").write_text("")
    return (["compare", "exact:width=4", "-o", str(tmp / "f")],
            f"Cannot write output directory {tmp / 'f'}: it is a file, not a directory")


def compare_read_only(tmp, ro):  # item 13
    return (["compare", "exact:width=4", "-o", str(ro)],
            f"Cannot write output directory {ro}: directory {ro} is not writable")


def huge_spec_item(tmp):  # a 100 KB spec was echoed back whole
    item = "x" * 100_000
    return (["export", f"drum:width=8,k=3,{item}"],
            f"Spec item '{'x' * 59}...{'x' * 11}' (100000 characters) must be key=value")


def huge_family_name(tmp):
    return (["export", "q" * 100_000 + ":width=8"],
            f"Unknown multiplier family '{'q' * 59}...{'q' * 11}' (100000 characters); known families: "
            f"exact, truncated, perforated, broken_array, drum, mitchell, loa, netlist")


# Found by fuzzing the CLI (session 19): a traceback, a silent clamp or a replaced device.
def compare_unknown_cost(tmp):
    return (["compare", "exact:width=4", "-q", "--cost", "foo", "-o", str(tmp / "c")],
            "Unknown cost figure 'foo'; choose from gates, aig_nodes, depth, depth_with_not, transistors, "
            "ice40_lut4, ice40_carry, toggles_per_op, weighted_toggles_per_op")


def cost_samples_zero(tmp):
    return ["cost", "exact:width=4", "--samples", "0"], "--samples must be between 1 and 16777216, not 0"


def cost_samples_huge(tmp):
    return (["cost", "exact:width=4", "--samples", "999999999999"],
            "--samples must be between 1 and 16777216, not 999999999999")


def export_to_a_pipe(tmp):
    os.mkfifo(tmp / "pipe")
    return (["export", "exact:width=4", "-o", str(tmp / "pipe")],
            f"Cannot write output file {tmp / 'pipe'}: it is not a regular file (a device, pipe or socket), "
            "and writing would replace it; choose a file path")


def _explore_checkpoint(tmp, text):
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoint.json").write_text(text)
    return ["explore", "--width", "3", "--no-sweep", "-q", "-o", str(tmp / "run"), "--evaluations", "20", "--resume"]


def explore_checkpoint_truncated(tmp):
    return (_explore_checkpoint(tmp, '{"broken'),
            f"Checkpoint '{tmp / 'run' / 'checkpoint.json'}' is not a readable checkpoint (Unterminated string "
            "starting at: line 1 column 2 (char 1)); start afresh with --overwrite")


def explore_checkpoint_a_list(tmp):
    return (_explore_checkpoint(tmp, "[]"),
            f"Checkpoint '{tmp / 'run' / 'checkpoint.json'}' is not an appmult explore checkpoint; start afresh "
            "with --overwrite")


def export_to_an_empty_name(tmp):
    return ["export", "exact:width=4", "-o", ""], "-o needs a file name (leave it out to write to standard output)"


def explore_width_and_width_a(tmp):
    return (["explore", "--width", "4", "--width-a", "5", "-o", str(tmp / "r"), "--evaluations", "20"],
            "Give --width or --width-a/--width-b, not both")


def explore_start_and_width(tmp):
    return (["explore", "exact:width=4", "--width", "5", "-o", str(tmp / "r"), "--evaluations", "20"],
            "--width, --width-a and --width-b set the default seed's widths; the seed circuit 'exact:width=4' "
            "has its own: drop them")


def assign_checkpoint_not_a_model(tmp):  # the message advised deleting the user's own file
    (tmp / "target.v").write_text("module x; endmodule\n")
    return (["assign", "drum:width=8,k=3", "--checkpoint", str(tmp / "target.v"), "--out", str(tmp / "o"),
             "--no-progress"],
            f"Pretrained model {tmp / 'target.v'} is corrupt or not a torch file; pass a model file that appmult's "
            "pretraining wrote, or leave --checkpoint out to pretrain here")


def _explore(tmp, *extra):
    return ["explore", *extra, "-q", "-o", str(tmp / "r"), "--evaluations", "20"]


def explore_network_flags_without_model(tmp):  # they did nothing without --model
    return (_explore(tmp, "--width", "4", "--epochs", "3", "--no-verify"),
            "--epochs, --no-verify only apply to the network-aware mode: add --model or drop them")


def explore_network_flag_equal_to_its_default(tmp):  # given at the default value: still refused
    return (_explore(tmp, "--width", "4", "--dataset", "digits"),
            "--dataset only applies to the network-aware mode: add --model or drop it")


def explore_bounds_with_an_empty_item(tmp):  # '1,,2' was read as 1,2
    return (_explore(tmp, "--width", "4", "--bounds", "1,,2"),
            "--bounds must be comma-separated numbers (no empty item), not '1,,2'")


def explore_error_rate_above_100(tmp):
    return (_explore(tmp, "--width", "4", "--max-er", "200"),
            "Constraint max_er is a percentage of the operand pairs, at most 100, not 200.0")


def explore_error_rate_bounds_above_100(tmp):
    return (_explore(tmp, "--width", "4", "--error", "er", "--bounds", "50,150"),
            "er bounds are percentages of the operand pairs, at most 100, not 150.0")


def explore_lam_huge(tmp):  # each child holds a simulation buffer: out of memory
    return (_explore(tmp, "--width", "4", "--lam", "100000", "--budget", "10s"),
            "lam (children per generation) must be at most 64, not 100000: each child holds a simulation buffer")


def explore_width_zero(tmp):  # said "Give a seed circuit (START) or --width"
    return _explore(tmp, "--width", "0"), "Operand width width_a must be an integer in 2..16, not 0"


def explore_signed_flag_against_the_spec(tmp):  # --signed was ignored for a spec seed
    return (_explore(tmp, "exact:width=4", "--signed"),
            "The seed 'exact:width=4' is unsigned (exact:width_a=4,width_b=4,signed=false); for a signed search "
            "write signed=true in the spec, or drop --signed")


def explore_hist_not_npz(tmp):  # numpy's allow_pickle message came through
    (tmp / "h.txt").write_text("p_a 1 2 3\n")
    return (_explore(tmp, "--width", "4", "--hist", str(tmp / "h.txt")),
            f"Cannot read histogram file {str(tmp / 'h.txt')!r}: it is not a numpy .npz file")


def explore_hist_single_array(tmp):
    np.save(tmp / "h.npy", np.ones(16))
    return (_explore(tmp, "--width", "4", "--hist", str(tmp / "h.npy")),
            f"Histogram file {str(tmp / 'h.npy')!r} holds a single array; save p_a and/or p_b with numpy.savez")


def explore_verilog_product_too_wide(tmp):  # said "Genome arrays do not match: tt, src and out disagree"
    (tmp / "m.v").write_text("module m(input [3:0] a, input [3:0] b, output [8:0] p);\n  assign p = a * b;\n"
                             "endmodule\n")
    return (_explore(tmp, str(tmp / "m.v"), "--unsigned", "--no-sweep"),
            "Module 'm' has a 9-bit product port 'p'; a 4x4 multiplier ('a' x 'b') has 8 product bits")


def explore_verilog_without_a_module(tmp):  # said "Cannot tell the top module among ; pass top="
    (tmp / "m.v").write_text("// nothing here\n")
    return (_explore(tmp, str(tmp / "m.v"), "--unsigned", "--no-sweep"), f"{str(tmp / 'm.v')!r} defines no module")


def characterize_over_a_users_report(tmp):  # a user's report.md was replaced without a word
    (tmp / "out").mkdir()
    (tmp / "out" / "report.md").write_text("my notes\n")
    return (["characterize", "exact:width=4", "-o", str(tmp / "out")],
            f"Output directory {tmp / 'out'} already holds report.md; pass --overwrite to replace the report "
            "there, or choose another -o")


def characterize_gradients_with_metrics_only(tmp):  # --gradients was ignored
    return (["characterize", "exact:width=4", "-o", str(tmp / "out"), "--metrics-only", "--gradients", "ste"],
            "--gradients needs a product LUT; --metrics-only has none: drop one of them")


def characterize_gradients_empty_item(tmp):
    return (["characterize", "exact:width=4", "-o", str(tmp / "out"), "--gradients", ""],
            "--gradients must be comma-separated names (or none), not ''")


def compare_over_a_users_json(tmp):  # a user's compare.json was replaced without a word
    (tmp / "c").mkdir()
    (tmp / "c" / "compare.json").write_text("{}\n")
    return (["compare", "exact:width=4", "-q", "-o", str(tmp / "c")],
            f"Output directory {tmp / 'c'} already holds compare.json; pass --overwrite to replace it, or choose "
            "another -o")


def compare_overwrite_without_output(tmp):
    return (["compare", "exact:width=4", "-q", "--overwrite"],
            "--overwrite replaces files in -o DIR: give -o, or drop --overwrite")


def verify_max_pairs_zero(tmp):  # was refused by the test bench only after "simulating ..."
    return ["verify", "exact:width=4", "--max-pairs", "0"], "--max-pairs must be at least 1, not 0"


def spec_with_an_empty_item(tmp):  # 'width=8,,signed=true' was accepted
    return (["export", "exact:width=8,,signed=true"],
            "Spec 'exact:width=8,,signed=true' has an empty item (two commas in a row, or a comma at an end)")


ROWS = [lut_is_directory, retrain_lut_is_directory, lut_gradients_not_a_list, lut_metadata_is_a_list,
        lut_header_without_width_a, lut_header_is_a_list, lut_metadata_says_4x4, lut_with_extra_member,
        export_to_directory, export_below_a_file, export_read_only,
        characterize_into_a_file, characterize_read_only, characterize_over_a_directory, compare_into_a_file,
        compare_read_only, huge_spec_item, huge_family_name, compare_unknown_cost, cost_samples_zero,
        cost_samples_huge, export_to_a_pipe, explore_checkpoint_truncated, explore_checkpoint_a_list,
        export_to_an_empty_name, explore_width_and_width_a, explore_start_and_width, assign_checkpoint_not_a_model,
        explore_network_flags_without_model, explore_network_flag_equal_to_its_default,
        explore_bounds_with_an_empty_item, explore_error_rate_above_100, explore_error_rate_bounds_above_100,
        explore_lam_huge, explore_width_zero, explore_signed_flag_against_the_spec,
        explore_hist_not_npz, explore_hist_single_array, explore_verilog_product_too_wide,
        explore_verilog_without_a_module, characterize_over_a_users_report,
        characterize_gradients_with_metrics_only, characterize_gradients_empty_item, compare_over_a_users_json,
        compare_overwrite_without_output, verify_max_pairs_zero, spec_with_an_empty_item]


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__ for r in ROWS])
def test_cli_message(row, tmp_path, request, capsys):
    if row.__code__.co_argcount == 2:
        argv, message = row(tmp_path, request.getfixturevalue("read_only_dir"))
    else:
        argv, message = row(tmp_path)
    if argv[0] in ("retrain", "assign"):
        pytest.importorskip("torch")
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"appmult {argv[0]}: error: {message}\n"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("acc_width", [1, 4])
def test_cli_mac_narrow_accumulator_warns(acc_width, tmp_path, capsys):
    # Item 17: --acc-width 1 or 4 for an 8x8 multiplier was accepted without a word. It is modular
    # arithmetic, legitimate but rarely meant: the command says what the unit will compute.
    out = tmp_path / "mac.v"
    assert main(["export", "exact:width=8", "--mac", "8", "--acc-width", str(acc_width), "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"appmult export: warning: MAC accumulator width {acc_width} is narrower than one 16-bit "
                      f"product of exact:width_a=8,width_b=8,signed=false: it keeps products and sums modulo "
                      f"2**{acc_width}")
    port = "output acc;" if acc_width == 1 else f"output [{acc_width - 1}:0] acc;"
    assert port in [line.strip() for line in out.read_text().splitlines()]


# --- --checkpoint: a file that is not a checkpoint ------------------------------------------------

def test_checkpoint_random_bytes_cli(tmp_path, capsys):
    # --checkpoint on random bytes relayed torch's advice to set weights_only=False.
    pytest.importorskip("torch")
    lut = _lut(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    argv = ["retrain", "--lut", str(lut), "--checkpoint", str(junk), "--model", "mlp", "--out",
            str(tmp_path / "run"), "--no-progress", "--epochs", "1"]
    code = main(argv)
    err = capsys.readouterr().err
    assert "weights_only" not in err
    assert (code, err) == (2, f"appmult retrain: error: Checkpoint {junk} is not an appmult or torch checkpoint file\n")


def test_read_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    from appmult.train import read_torch_file
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert read_torch_file(path)["w"].tolist() == [0, 1, 2]


class _Custom:
    pass


def test_read_torch_file_wrong(tmp_path):
    torch = pytest.importorskip("torch")
    from appmult.errors import MissingFileError
    from appmult.train import CheckpointError, read_torch_file
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    objects = tmp_path / "objects.pt"
    torch.save({"x": _Custom()}, objects)
    cases = [
        (junk, CheckpointError, f"Checkpoint {junk} is not an appmult or torch checkpoint file"),
        (objects, CheckpointError, f"Checkpoint {objects} holds objects other than tensors and plain "
                                   f"containers; appmult reads only weights and never unpickles code"),
        (tmp_path, MissingFileError, f"Checkpoint {tmp_path} is a directory, not a file"),
        (tmp_path / "nope.pt", MissingFileError, f"Checkpoint {tmp_path / 'nope.pt'} does not exist"),
    ]
    for path, exc, message in cases:
        with pytest.raises(exc, match=exact(message)):
            read_torch_file(path)


def test_lut_path_messages_python(tmp_path):
    from appmult.errors import MissingFileError
    from appmult.lut_gen import load
    from appmult.nn import load_lut
    for loader in (load, load_lut):
        with pytest.raises(MissingFileError, match=exact(f"LUT file {tmp_path} is a directory, not a file")):
            loader(tmp_path)
        with pytest.raises(MissingFileError, match=exact(f"LUT file {tmp_path / 'x.npz'} does not exist")):
            loader(tmp_path / "x.npz")


def test_explore_signed_and_unsigned_conflict(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explore", "--width", "4", "--signed", "--unsigned", "-o", str(tmp_path / "r"), "--evaluations", "20"])
    assert exc.value.code == 2
    assert "argument --unsigned: not allowed with argument --signed" in capsys.readouterr().err


def test_characterize_half_window_not_a_number(tmp_path, capsys):  # said "invalid _half_window value"
    with pytest.raises(SystemExit) as exc:
        main(["characterize", "exact:width=4", "-o", str(tmp_path), "--half-window", "abc"])
    assert exc.value.code == 2
    assert "argument --half-window: Half window must be one of 1, 2, 4, ..., 64 or 'auto', not 'abc'" in \
        capsys.readouterr().err


def test_characterize_overwrite_replaces_only_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["characterize", "exact:width=4", "-o", str(out), "-q", "--no-plots"]
    assert main(base) == 0
    (out / "mine.txt").write_text("keep\n")
    assert main(base) == 2  # a second run is refused without --overwrite
    assert main([*base, "--overwrite", "--gradients", "none"]) == 0
    assert (out / "mine.txt").read_text() == "keep\n"
    from appmult.lut_gen import load
    lut = load(out / "lut.npz")
    assert lut.gradients == {}  # --gradients none
    assert sorted(p.name for p in out.iterdir()) == ["lut.npz", "mine.txt", "report.json", "report.md"]
    # the exact 4x4 table, independent of the report's own figures
    a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    assert np.array_equal(lut.product, a * b)


def test_characterize_overwrite_drops_plots_the_new_run_leaves_out(tmp_path):
    out = tmp_path / "out"
    assert main(["characterize", "exact:width=4", "-o", str(out), "-q"]) == 0
    assert (out / "error_heatmap.png").is_file()
    assert main(["characterize", "exact:width=4", "-o", str(out), "-q", "--no-plots", "--overwrite"]) == 0
    assert not list(out.glob("*.png"))


def test_compare_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", "exact:width=4", "-q", "-o", str(out)]) == 0
    assert main(["compare", "exact:width=4", "truncated:width=4,columns=2", "-q", "-o", str(out), "--overwrite"]) == 0
    import json
    assert len(json.loads((out / "compare.json").read_text())) == 2


def test_explore_seed_signedness_that_agrees_is_accepted(tmp_path):
    from appmult.explore import seed_genome
    genome, _ = seed_genome("exact:width=4,signed=true", signed=True)
    assert genome.signed
    genome, _ = seed_genome("exact:width=4", signed=False)
    assert not genome.signed


def test_explore_verilog_seed_says_what_was_inferred(tmp_path, capsys):
    # The README says what was inferred from a Verilog seed is reported; it was only logged.
    (tmp_path / "m.v").write_text("module m(input [3:0] x, input [3:0] y, output [7:0] z);\n  assign z = x * y;\n"
                                  "endmodule\n")
    assert main(_explore(tmp_path, str(tmp_path / "m.v"), "--unsigned", "--no-sweep")) == 0
    assert ("took operand a = 'x' (4 bits), operand b = 'y' (4 bits) and product p = 'z' (8 bits)"
            in capsys.readouterr().err)
