"""Kill tests: SIGKILL the driver, kill actors mid-batch, lose the Ray head; then rerun the same
command. 0 rows lost, 0 duplicates, no crash that was not injected (tests/helpers/fault_scenarios.py,
the runner of `python jobs/fault_scenarios.py`)."""

import json

import pytest

from tests.helpers import fault_scenarios


def scenarios(tmp_path, *names, **kw):
    out = tmp_path / "table.json"
    args = ["--items", str(kw.get("items", 6)), "--kills", str(kw.get("kills", 1)),
            "--json", str(out), "--only", *names]
    code = fault_scenarios.main(args)
    return code, {r["scenario"]: r for r in json.loads(out.read_text())}


def test_driver_killed_actors_killed_and_head_lost_then_rerun(tmp_path):
    code, table = scenarios(tmp_path, "driver_sigkill", "actor_sigkill", "head_restart")
    for name, r in table.items():
        assert (r["rows_lost"], r["duplicates"], r["parent_crashes"]) == (0, 0, 0), r
        assert r["rows_expected"] == 6
    # each fault happened: killed once, then completed by the rerun
    assert table["driver_sigkill"]["faults_injected"] == 1 and table["driver_sigkill"]["driver_runs"] == 2
    assert table["head_restart"]["faults_injected"] == 1 and table["head_restart"]["driver_runs"] == 2
    # two actors killed mid-run; Ray Data retried their work within the same run
    assert table["actor_sigkill"]["faults_injected"] == 2 and table["actor_sigkill"]["driver_runs"] == 1
    assert code == 0


def test_of_overlapping_runs_on_one_output_one_completes_and_the_others_stop_at_once(tmp_path):
    code, table = scenarios(tmp_path, "overlapping_runs")
    r = table["overlapping_runs"]
    assert (r["rows_lost"], r["duplicates"], r["parent_crashes"]) == (0, 0, 0), r
    assert r["driver_runs"] == 3 and r["refused_runs"] == 2, r  # two at once, one mid-run: one completes
    assert code == 0


@pytest.mark.slow
def test_losing_a_worker_node_loses_and_doubles_nothing(tmp_path):
    code, table = scenarios(tmp_path, "node_lost_model", "node_lost_cpu")
    for name, r in table.items():
        assert (r["rows_lost"], r["duplicates"], r["parent_crashes"]) == (0, 0, 0), r
        assert r["faults_injected"] >= 1 and r["finished_by_itself"] is not None, r  # the node was lost mid-run
    assert code == 0


@pytest.mark.slow
def test_every_fault_scenario(tmp_path):
    code, table = scenarios(tmp_path, *fault_scenarios.SCENARIOS, items=12, kills=3)
    assert code == 0 and len(table) == len(fault_scenarios.SCENARIOS), table
