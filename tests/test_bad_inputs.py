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


ROWS = [lut_is_directory, retrain_lut_is_directory, lut_gradients_not_a_list, lut_metadata_is_a_list,
        lut_header_without_width_a, lut_header_is_a_list, lut_metadata_says_4x4, lut_with_extra_member,
        export_to_directory, export_below_a_file, export_read_only,
        characterize_into_a_file, characterize_read_only, characterize_over_a_directory, compare_into_a_file,
        compare_read_only, huge_spec_item, huge_family_name, compare_unknown_cost, cost_samples_zero,
        cost_samples_huge, export_to_a_pipe, explore_checkpoint_truncated, explore_checkpoint_a_list,
        export_to_an_empty_name, explore_width_and_width_a, explore_start_and_width, assign_checkpoint_not_a_model]


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
