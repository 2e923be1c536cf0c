"""The shipped Prometheus alert rules (monitoring/), checked with promtool (Debian's prometheus,
installed by scripts/bootstrap): they parse, each fires when it should and not before
(thinwatchd-alerts.test.yml), and a real daemon's metrics file (sample.prom, recorded in the
systemd guest by tests/systemd/test_service.py) has every metric they use and fires none."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "thinwatchd-alerts.yml"
SAMPLE = MONITORING / "sample.prom"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `bash scripts/bootstrap` installs Debian's prometheus")
    return path


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, check=False, cwd=MONITORING
    )


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_the_rules_parse(promtool: str) -> None:
    done = run(promtool, "check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_when_it_should_and_not_before(promtool: str) -> None:
    done = run(promtool, "test", "rules", "thinwatchd-alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    tested = yaml.safe_load((MONITORING / "thinwatchd-alerts.test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tested
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(alert_names())


def sample_series() -> dict[str, str]:
    """The sample's samples: series text -> value."""
    series = {}
    for line in SAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = value
    return series


def test_the_recorded_sample_has_every_metric_the_rules_use(promtool: str) -> None:
    done = run(promtool, "check", "metrics", stdin=SAMPLE.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    exprs = " ".join(
        rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    )
    used = set(re.findall(r"thinwatchd_[a-z_]+", exprs))
    have = {name.split("{", 1)[0] for name in sample_series()}
    # thinwatchd_data_max_bytes is there only for a pool with a cap: the sample's has one.
    assert used <= have, used - have


def test_a_healthy_pool_fires_no_alert(promtool: str, tmp_path: Path) -> None:
    """The sample's values held for an hour: a pool that grew and is fine."""
    series = [
        {
            "series": name.replace("{", '{instance="h1",', 1),
            "values": f"{value}+0x60",
        }
        for name, value in sample_series().items()
    ]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "60m", "alertname": name, "exp_alerts": []}
                    for name in alert_names()
                ],
            }
        ],
    }
    path = tmp_path / "sample.test.yml"
    path.write_text(yaml.safe_dump(test))
    done = run(promtool, "test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
