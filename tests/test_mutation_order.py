"""The killer-first test order of ``make mutate`` (tests/mutation_order.py)."""

from __future__ import annotations

import json

import pytest

import mutation_order as mo


def test_function_of_strips_the_mutant_number():
    assert mo.function_of("appmult.codes.x_check_codes__mutmut_12") == "appmult.codes.x_check_codes"
    assert mo.function_of("appmult.nn.tables.xǁLutTablesǁ_apply__mutmut_3") == "appmult.nn.tables.xǁLutTablesǁ_apply"
    for bad in ("appmult.codes.x_check_codes", "a__mutmut_", "a__mutmut_x"):
        with pytest.raises(ValueError, match="not a mutmut mutant name"):
            mo.function_of(bad)


def test_killer_first_puts_remembered_killers_first_by_count_then_keeps_the_order():
    ids = ["t0", "t1", "t2", "t3", "t4"]
    order = mo.killer_first(ids, {"t3": 1, "t1": 5, "gone": 9, "t4": 1})
    assert [ids[i] for i in order] == ["t1", "t3", "t4", "t0", "t2"]
    assert sorted(order) == list(range(len(ids)))  # a permutation: every test still runs
    assert mo.killer_first(ids, {}) == list(range(5))


def test_read_log_counts_each_mutant_once_by_its_last_kill(tmp_path):
    log = tmp_path / mo.LOG_NAME
    log.write_text("m.f__mutmut_1\tA\n"
                   "m.f__mutmut_2\tA\n"
                   "m.f__mutmut_1\tB\n"   # mutant 1 rerun, killed by B this time
                   "m.g__mutmut_7\tA\n"
                   "garbage line\n")
    assert mo.read_log(log) == {"m.f": {"A": 1, "B": 1}, "m.g": {"A": 1}}


def test_merge_replaces_the_functions_a_run_saw_and_keeps_the_others():
    history = {"f": {"A": 3, "B": 1}, "g": {"C": 2}}
    assert mo.merge(history, {"f": {"B": 4}}) == {"f": {"B": 4}, "g": {"C": 2}}
    assert history == {"f": {"A": 3, "B": 1}, "g": {"C": 2}}  # not modified


def test_save_load_round_trip_atomic_and_missing_file_is_empty(tmp_path):
    path = tmp_path / "killers.json"
    assert mo.load(path) == {}
    history = {"m.f": {"tests/t.py::a": 2, "tests/t.py::b[1-x]": 1}, "m.g": {"tests/t.py::a": 5}, "m.h": {}}
    mo.save(history, path)
    assert mo.load(path) == {"m.f": history["m.f"], "m.g": history["m.g"]}  # empty entries dropped
    raw = json.loads(path.read_text())
    assert raw["tests"] == ["tests/t.py::a", "tests/t.py::b[1-x]"]  # each node id stored once
    assert [p.name for p in tmp_path.iterdir()] == ["killers.json"]  # no temporary left


def test_main_merges_the_log_into_the_history_and_removes_the_log(tmp_path, monkeypatch, capsys):
    history = tmp_path / "killers.json"
    monkeypatch.setattr(mo, "HISTORY", history)
    mo.save({"m.g": {"T": 1}}, history)
    mutants = tmp_path / "mutants"
    mutants.mkdir()
    assert mo.main(["merge", str(mutants)]) == 0  # no log: nothing to do
    assert mo.load(history) == {"m.g": {"T": 1}}
    (mutants / mo.LOG_NAME).write_text("m.f__mutmut_1\tA\nm.f__mutmut_2\tA\n")
    assert mo.main(["merge", str(mutants)]) == 0
    assert mo.load(history) == {"m.f": {"A": 2}, "m.g": {"T": 1}}
    assert not (mutants / mo.LOG_NAME).exists()
    assert "from 2 mutants merged" in capsys.readouterr().out
    assert mo.main(["oops"]) == 2


def test_conftest_hooks_reorder_and_log_only_for_a_mutant_under_make_mutate(tmp_path, monkeypatch):
    import types

    import conftest

    items = [types.SimpleNamespace(nodeid=n) for n in ("a", "b", "c")]
    monkeypatch.setattr(conftest, "_KILLERS", {"m.f": {"c": 2, "b": 1}}, raising=False)
    monkeypatch.chdir(tmp_path)
    failed = types.SimpleNamespace(failed=True, nodeid="c")
    for env in ({}, {"MUTANT_UNDER_TEST": "m.f__mutmut_3"}, {"APPMULT_MUTMUT_WARMUP": "1", "MUTANT_UNDER_TEST": "stats"}):
        for key in ("APPMULT_MUTMUT_WARMUP", "MUTANT_UNDER_TEST"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        kept = list(items)
        conftest.pytest_collection_modifyitems(None, kept)
        conftest.pytest_runtest_logreport(failed)
        assert kept == items and not (tmp_path / mo.LOG_NAME).exists()
    monkeypatch.setenv("APPMULT_MUTMUT_WARMUP", "1")
    monkeypatch.setenv("MUTANT_UNDER_TEST", "m.f__mutmut_3")
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["c", "b", "a"]
    conftest.pytest_runtest_logreport(types.SimpleNamespace(failed=False, nodeid="b"))
    conftest.pytest_runtest_logreport(failed)
    assert (tmp_path / mo.LOG_NAME).read_text() == "m.f__mutmut_3\tc\n"


def _fake_mutants(tmp_path, hashes):
    """A ``mutants/`` tree with mutmut's .meta files holding ``hashes`` ({module: {fn: hash}})."""
    root = tmp_path / "mutants"
    for module, by_fn in hashes.items():
        meta = root.joinpath(*module.split(".")).with_suffix(".py.meta")
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"exit_code_by_key": {}, "hash_by_function_name": by_fn}))
    return root


def test_accepted_equivalents_hold_while_their_function_is_unchanged(tmp_path, monkeypatch, capsys):
    root = _fake_mutants(tmp_path, {"appmult.codes": {"x_f": "h1", "x_g": "h2"},
                                    "appmult.nn.tables": {"xǁLutTablesǁ_apply": "h3"}})
    assert mo.function_hashes(root) == {"appmult.codes.x_f": "h1", "appmult.codes.x_g": "h2",
                                        "appmult.nn.tables.xǁLutTablesǁ_apply": "h3"}
    path = tmp_path / "eq.tsv"
    monkeypatch.setattr(mo, "EQUIVALENTS", path)
    assert mo.load_equivalents() == {}
    assert mo.main(["accept", str(root), "appmult.codes.x_f__mutmut_3", "appmult.nn.tables.xǁLutTablesǁ_apply__mutmut_1"]) == 0
    assert "2 mutants accepted" in capsys.readouterr().out
    assert path.read_text().startswith("# Mutants reviewed as equivalent")  # the header explains the file
    accepted = mo.load_equivalents()
    assert accepted == {"appmult.codes.x_f__mutmut_3": "h1", "appmult.nn.tables.xǁLutTablesǁ_apply__mutmut_1": "h3"}
    assert mo.still_equivalent(accepted, mo.function_hashes(root)) == set(accepted)
    # the function changed: its mutants are renumbered and must run (and be reviewed) again
    root2 = _fake_mutants(tmp_path / "b", {"appmult.codes": {"x_f": "CHANGED", "x_g": "h2"},
                                           "appmult.nn.tables": {"xǁLutTablesǁ_apply": "h3"}})
    assert mo.still_equivalent(accepted, mo.function_hashes(root2)) == {"appmult.nn.tables.xǁLutTablesǁ_apply__mutmut_1"}
    with pytest.raises(SystemExit, match="no such mutated function"):
        mo.accept(["appmult.codes.x_gone__mutmut_1"], root)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_conftest_skips_an_accepted_equivalent_with_mutmuts_skipped_status(monkeypatch):
    import types

    import conftest

    monkeypatch.setattr(conftest, "_KILLERS", {}, raising=False)
    monkeypatch.setattr(conftest, "_EQUIVALENT", frozenset({"m.f__mutmut_2"}), raising=False)
    monkeypatch.setenv("APPMULT_MUTMUT_WARMUP", "1")
    items = [types.SimpleNamespace(nodeid="a")]
    monkeypatch.setenv("MUTANT_UNDER_TEST", "m.f__mutmut_1")
    conftest.pytest_collection_modifyitems(None, items)  # not accepted: runs
    monkeypatch.setenv("MUTANT_UNDER_TEST", "m.f__mutmut_2")
    with pytest.raises(pytest.exit.Exception) as exc:
        conftest.pytest_collection_modifyitems(None, items)
    assert exc.value.returncode == mo.SKIP_EXIT_CODE == 34


def test_skip_exit_code_is_mutmuts_skipped_status():
    stats = pytest.importorskip("mutmut.stats")
    assert stats.status_by_exit_code[mo.SKIP_EXIT_CODE] == "skipped"
