"""Load, fault and soak run of the lab server under gunicorn, reduced (marked slow).

The full run with the figures for the README is ``python -m attention_lens.bench.load``.
"""

from __future__ import annotations

import pytest

from attention_lens.bench import load as loadtest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_loadtest_reduced(tmp_path):
    report = loadtest.main(["--requests", "48", "--clients", "8", "--soak", "60",
                            "--output", str(tmp_path / "report.json")])
    for workers in (1, 2):
        load = report[f"load_{workers}_worker"]
        assert load["errors"] == 0, load["error_samples"]
        assert load["ok"] == 48 and load["p95_ms"] >= load["p50_ms"] > 0
        assert report[f"unauthenticated_status_{workers}"] == 401
    assert report["page_callbacks"], "no page callback was exercised"
    assert {"eigenvalues", "patching", "heads", "logit-lens"} <= set(report["page_callbacks"])
    for workers in (1, 2):  # every background job a page started answered
        load = report[f"load_{workers}_worker"]
        assert not load["jobs"].get("unanswered"), load["jobs"]
        assert {"eigenvalues", "overview"} <= set(load["pages"])
    corrupt = report["corrupt_model"]
    assert corrupt["passed"] and "model.safetensors" in corrupt["reason"]
    fault = report["fault"]
    assert fault["killed_pid"] not in fault["workers_after"] and len(fault["workers_after"]) == 2
    assert fault["lost"] <= fault["max_in_flight_on_killed_worker"]
    assert fault["recovered_after_s"] is not None
    soak = report["soak"]
    assert soak["errors"] == 0 and soak["same_worker"] and soak["rss_growth_mb"] < 100
    assert report["passed"]
    assert (tmp_path / "report.json").is_file()
