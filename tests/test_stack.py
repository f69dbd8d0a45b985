"""The local stack: up, status, down on real processes; only our own processes are stopped."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from ray_app.settings import Settings, load_settings
from ray_app.stack import LocalStack, PortInUseError, pid_alive


def llmops(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "llmops"), *args],
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_cli_up_status_down_runs_mlflow_and_leaves_nothing_behind(tmp_path):
    env = {"LLMOPS_HOME": str(tmp_path), "LLMOPS_MLFLOW_PORT": str(free_port())}
    started = llmops("up", "--service", "mlflow", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    stack = LocalStack(load_settings(home=tmp_path, mlflow_port=int(env["LLMOPS_MLFLOW_PORT"])))
    record = stack._load()["mlflow"]
    assert pid_alive(record.pid)
    assert Path(record.log).is_file()

    again = llmops("up", "--service", "mlflow", env=env)
    assert again.returncode == 0
    assert f"already running (pid {record.pid})" in again.stdout
    assert stack._load()["mlflow"].pid == record.pid

    shown = llmops("status", env=env)
    assert "mlflow" in shown.stdout
    assert f"http://127.0.0.1:{env['LLMOPS_MLFLOW_PORT']}" in shown.stdout
    mlflow_line = next(line for line in shown.stdout.splitlines() if "mlflow" in line)
    assert "healthy" in mlflow_line
    assert shown.returncode == 3  # ray is not up in this home: status says so in its exit code
    # A newcomer opening the Ray dashboard gets a token prompt: status says where the token is.
    assert "llmops token ray" in shown.stdout and str(tmp_path / "stack" / "ray_auth_token") in shown.stdout
    token = llmops("token", "ray", env=env)
    assert token.returncode == 0 and token.stdout.strip() == (tmp_path / "stack" / "ray_auth_token").read_text()
    wrong = llmops("token", "grafana", env=env)
    assert wrong.returncode == 1 and "expected one of ray, api, prometheus" in wrong.stderr

    stopped = llmops("down", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(record.pid)
    assert group_members(record.pid) == []  # the server's worker children are gone too
    assert stack._load() == {}


def test_a_taken_port_is_named_in_the_error(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        stack = LocalStack(load_settings(home=tmp_path, mlflow_port=port))
        with pytest.raises(PortInUseError, match=f"port {port} \\(mlflow http\\) is already in use"):
            stack.up(["mlflow"], echo=lambda _line: None)
        result = llmops("up", "-s", "mlflow", env={"LLMOPS_HOME": str(tmp_path), "LLMOPS_MLFLOW_PORT": str(port)})
    assert result.returncode == 1
    assert f"port {port} (mlflow http) is already in use" in result.stderr
    assert stack._load() == {}


def test_down_with_nothing_started_stops_nothing(tmp_path):
    result = llmops("down", env={"LLMOPS_HOME": str(tmp_path)})
    assert result.returncode == 0
    assert "nothing to stop" in result.stdout


def test_ray_head_answers_dashboard_and_jobs_api(ray_cluster: Settings):
    import json
    import urllib.request

    rows = {row.name: row for row in LocalStack(ray_cluster).status()}
    assert rows["ray"].healthy and rows["ray"].running
    headers = ray_cluster.ray_auth_headers()
    version = urllib.request.Request(f"{ray_cluster.ray_dashboard_url}/api/version", headers=headers)
    with urllib.request.urlopen(version, timeout=10) as response:
        assert "ray_version" in json.loads(response.read())
    jobs = urllib.request.Request(f"{ray_cluster.ray_dashboard_url}/api/jobs/", headers=headers)
    with urllib.request.urlopen(jobs, timeout=10) as response:
        assert isinstance(json.loads(response.read()), list)


def test_ray_head_refuses_requests_without_the_token(ray_cluster: Settings):
    import urllib.error
    import urllib.request

    token_file = ray_cluster.ray_auth_token_path
    assert token_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        request = urllib.request.Request(f"{ray_cluster.ray_dashboard_url}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code in (401, 403)


def test_help_lists_the_commands_that_exist():
    result = llmops("--help", env={})
    assert result.returncode == 0
    for command in ("up", "down", "status", "config", "resolve-model", "store", "demo"):
        assert command in result.stdout
