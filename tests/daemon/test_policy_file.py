"""The policy file (CORRAL_POLICY): parsing, errors naming the line, which rule applies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from corral.daemon.config import Config
from corral.daemon.policy import NO_RULE, PolicyError, load, parse
from corral.scheduler import ModelPolicy, Priority

EXAMPLE = """\
# every model: low priority unless said otherwise
[models."*"]
priority = "low"
keep_alive = "10m"

[models."gemma3:270m"]
pinned = true
priority = "high"
num_parallel = 4
gpus = ["0", 1]

[models.'qwen*']
max_queue = 8
replicas = 2
num_ctx = 8192
keep_alive = -1
"""


def test_example_parses_and_rules_merge_glob_then_exact() -> None:
    p = parse(EXAMPLE)
    g = p.rule_for("gemma3:270m")
    assert (g.pinned, g.priority, g.num_parallel, g.gpus) == (True, Priority.HIGH, 4, ("0", "1"))
    assert g.keep_alive == 600.0  # from "*"
    q = p.rule_for("qwen2.5:7b")
    assert (q.priority, q.max_queue, q.replicas, q.num_ctx) == (Priority.LOW, 8, 2, 8192)
    assert math.isinf(q.keep_alive)  # -1 = forever, the later table wins
    assert q.scheduler_policy("qwen2.5:7b") == ModelPolicy(
        name="qwen2.5:7b", priority=Priority.LOW, max_queue=8, replicas=2
    )
    assert p.pinned_patterns() == ["gemma3:270m"]
    assert g.describe() == {
        "num_parallel": 4,
        "keep_alive": 600.0,
        "pinned": True,
        "priority": "high",
        "gpus": ["0", "1"],
    }


def test_latest_tag_matches_both_ways() -> None:
    p = parse('[models."llama3"]\nnum_parallel = 2\n[models."phi:latest"]\nnum_parallel = 3\n')
    assert p.rule_for("llama3:latest").num_parallel == 2
    assert p.rule_for("phi").num_parallel == 3
    assert p.rule_for("llama3:8b") == NO_RULE


def test_empty_file_is_no_policy() -> None:
    assert parse("").rule_for("anything") == NO_RULE


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[models."a"]\nnum_parallel = 0\n', ':2: models."a".num_parallel: must be an integer'),
        ('[models."a"]\n\npinned = "yes"\n', ':3: models."a".pinned: must be true or false'),
        ('[models."a"]\npriority = "urgent"\n', ':2: models."a".priority: must be "high"'),
        ('[models."a"]\nkeep_alive = "5 minutes"\n', ':2: models."a".keep_alive: must be'),
        ('[models."a"]\ngpus = []\n', ':2: models."a".gpus: must be a non-empty list'),
        ('[models."a"]\nnum_ctx = 2\n', ':2: models."a".num_ctx: must be an integer >= 4'),
        ('[models."a"]\nx = 1\n[models."b"]\nreplicas = 1.5\n', ':2: models."a".x: unknown'),
        ('[models."a"]\nreplicas = 2\n[models."b"]\nreplicas = 1.5\n', ':4: models."b".replicas'),
        ("[server]\nport = 1\n", ':1: unknown table "server"'),
        ('[models."a"]\nnum_parallel = \n', "at line 2"),  # TOML syntax: tomllib's position
    ],
)
def test_errors_name_the_line(text: str, where: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(text, "/etc/corral/policy.toml")
    assert str(e.value).startswith("/etc/corral/policy.toml")
    assert where in str(e.value)


def test_load_reads_a_file_and_says_when_it_cannot(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(EXAMPLE)
    assert load(f).rule_for("gemma3:270m").pinned
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load(tmp_path / "missing.toml")


def test_config_reads_the_path_and_the_aging() -> None:
    c = Config.from_env({"CORRAL_POLICY": "/etc/p.toml", "CORRAL_PRIORITY_AGING": "10s"})
    assert c.policy_path == Path("/etc/p.toml") and c.priority_aging == 10.0
    assert Config.from_env({}).policy_path is None and Config.from_env({}).priority_aging == 30.0
    assert Config.from_env({"CORRAL_PRIORITY_AGING": "0"}).priority_aging == 30.0


def test_doctor_shows_the_tables_and_a_bad_file_as_a_problem(tmp_path: Path) -> None:
    from corral.daemon.cli import doctor

    f = tmp_path / "policy.toml"
    f.write_text(EXAMPLE)
    cfg = Config(models=tmp_path / "models", policy_path=f)
    report = doctor._policy(cfg)
    assert report["tables"]["gemma3:270m"]["pinned"] is True
    text = "\n".join(doctor._render_policy(report))
    assert '[models."qwen*"] keep_alive=-1, num_ctx=8192, max_queue=8, replicas=2' in text
    f.write_text('[models."a"]\npinned = 1\n')
    bad = doctor._policy(cfg)
    assert bad["error"].endswith(':2: models."a".pinned: must be true or false, not 1')
    assert "NOT usable" in doctor._render_policy(bad)[0]
    assert doctor._render_policy(doctor._policy(Config()))[0].startswith("  none")
