"""`vllm ha-check`: what the preflight reports on this machine, and its exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess

import jsonschema
import pytest

from tests.utils import ON_CUDA, REPO, child_env, vllm_cli
from vllm.ha.preflight import CheckResult, PreflightReport, Status, parse_features

SCHEMA = json.loads((REPO / "vllm/ha/schemas/ha_check.schema.json").read_text())
STATUS = {c: s for c, s in (
    ("devices", "ok"), ("driver", "ok"), ("checkpoint_api", "ok"), ("nvcomp", "ok"),
    ("peer_access", None))} if ON_CUDA else {
    "devices": "missing", "driver": "missing", "checkpoint_api": "missing",
    "nvcomp": "missing", "peer_access": "missing"}


def ha_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*vllm_cli(), "ha-check", *args], capture_output=True, text=True,
                          env=child_env(), timeout=300)


@pytest.fixture(scope="module")
def report() -> dict:
    proc = ha_check("--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def test_json_validates_against_the_schema(report):
    jsonschema.validate(report, SCHEMA)
    assert report["required"] == [] and report["ok"] is True


def test_schema_rejects_a_malformed_report(report):
    bad = json.loads(json.dumps(report))
    bad["checks"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_distribution_is_this_build(report):
    dist = _check(report, "distribution")
    assert dist["status"] == "ok"
    assert dist["data"]["ha_version"].startswith("0.26.0+ha1")
    assert dist["data"]["upstream_version"] == "0.26.0"
    assert dist["data"]["dist_version"] == importlib.metadata.version("vllm")
    series = [ln.strip() for ln in (REPO / "patches/series").read_text().splitlines()
              if ln.strip()]
    assert dist["data"]["patches"] == series


@pytest.mark.parametrize("name", sorted(STATUS))
def test_device_checks_report_what_this_machine_has(report, name):
    check = _check(report, name)
    if STATUS[name] is not None:
        assert check["status"] == STATUS[name], check
    assert check["detail"]


def test_cpu_reasons_name_what_is_missing(report):
    if ON_CUDA:
        pytest.skip("CPU-host reasons")
    assert "torch.cuda.is_available() is False" in _check(report, "devices")["detail"]
    assert "libcuda.so.1 not loadable" in _check(report, "driver")["detail"]
    assert "driver >= 570" in _check(report, "checkpoint_api")["detail"]
    assert "found 0" in _check(report, "peer_access")["detail"]


def test_nixl_loads_the_ucx_backend(report):
    nixl = _check(report, "nixl")
    assert nixl["status"] == "ok", nixl
    assert "UCX" in nixl["data"]["loaded"]


def test_features_follow_the_checks(report):
    features = report["features"]
    assert features["mirror"] == {"ok": True, "missing": []}
    if not ON_CUDA:
        assert features["checkpoint"] == {
            "ok": False, "missing": ["devices", "driver", "checkpoint_api"]}
        assert features["compression"]["ok"] is False
    else:
        assert features["checkpoint"]["ok"] and features["compression"]["ok"]


def test_text_report_has_one_line_per_check_with_status():
    proc = ha_check()
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for name in ("distribution", "devices", "driver", "checkpoint_api", "nixl", "nvcomp",
                 "peer_access", "host_memory"):
        line = next(ln for ln in lines if ln[10:].startswith(name))
        assert line[:9] in ("[ok     ]", "[MISSING]", "[info   ]"), line
    assert any(ln.startswith("feature mirror ") and "usable" in ln for ln in lines)


@pytest.mark.parametrize("features,code", [
    ("mirror", 0),
    ("checkpoint", 0 if ON_CUDA else 1),
    ("mirror,checkpoint", 0 if ON_CUDA else 1),
])
def test_require_sets_the_exit_code(features, code):
    proc = ha_check("--require", features)
    assert proc.returncode == code, proc.stdout + proc.stderr[-2000:]
    if code:
        assert "feature checkpoint   NOT usable: needs devices, driver, checkpoint_api " \
               "(required)" in proc.stdout


def test_unknown_feature_is_a_usage_error():
    proc = ha_check("--require", "mirror,teleport")
    assert proc.returncode == 2
    assert "--require: unknown feature(s) teleport; choose from mirror, mirror-p2p, " \
           "checkpoint, compression" in proc.stderr


def _result(name: str, ok: bool) -> CheckResult:
    return CheckResult(name, Status.OK if ok else Status.MISSING, "x")


def test_report_ok_only_when_every_required_feature_is_usable():
    names = ("distribution", "devices", "driver", "checkpoint_api", "nixl", "nvcomp",
             "peer_access", "host_memory")
    checks = [_result(n, n != "nvcomp") for n in names]
    assert PreflightReport(checks, ["mirror", "checkpoint"]).ok
    assert not PreflightReport(checks, ["compression"]).ok
    assert PreflightReport(checks, ["compression"]).features()["compression"] == {
        "ok": False, "missing": ["nvcomp"]}


def test_parse_features_dedups_and_rejects_unknown():
    assert parse_features("mirror, checkpoint,mirror") == ["mirror", "checkpoint"]
    assert parse_features("") == []
    with pytest.raises(ValueError, match="unknown feature"):
        parse_features("mirror,bogus")


def test_ha_check_leaves_no_files_in_the_working_directory(tmp_path):
    proc = subprocess.run([*vllm_cli(), "ha-check"], capture_output=True, text=True,
                          env=child_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
