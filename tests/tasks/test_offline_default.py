"""The default run is offline everywhere: no network connection, the same row whether the data host answers or not.

Every socket connection the process attempts is recorded (`connections`); with `blocked` they also fail,
as on a machine without network. The data host is stood in for by the localhost server of
tests/tasks/test_data_sources.py, holding full zsRE files that differ from the shipped ones: a run that used
them, or even probed the host, would show.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.core.config import RunConfig
from bench.runner.run import resolve
from tests.tasks.test_data_sources import Server, payload, zsre_records

runner = CliRunner()
OFFLINE_VARS = ("EDITBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every socket connection attempted from now on (address), the offline variables lifted."""
    seen: list = []
    real_connect, real_create = socket.socket.connect, socket.create_connection

    def connect(self, address):  # noqa: ANN001 - socket's own signature
        seen.append(address)
        return real_connect(self, address)

    def create_connection(address, *a, **k):  # noqa: ANN001
        seen.append(address)
        return real_create(address, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    return seen


@pytest.fixture
def blocked(monkeypatch, connections) -> list:
    """As `connections`, but every attempt fails as it does without a network."""

    def refuse(address: object) -> None:
        connections.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(host))
    return connections


@pytest.fixture
def data_host(monkeypatch):
    """A reachable stand-in for the data host with full zsRE files (40 train / 30 eval, not the shipped ones)."""
    s = Server()
    s.files = {"zsre_mend_train.json": payload(zsre_records(40, "train")),
               "zsre_mend_eval.json": payload(zsre_records(30, "eval"))}
    monkeypatch.setenv("EDITBENCH_DATA_URL", s.url)
    yield s
    s.close()


def plan(tmp_path: Path) -> dict:
    r = runner.invoke(app, ["run", "--dry-run", "--json", "--results", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_the_no_argument_run_opens_no_connection_and_ignores_a_reachable_host(blocked, tmp_path, monkeypatch):
    offline = plan(tmp_path)  # `bench run` with no argument, resolved: names, data, sizes, the config hash
    data = resolve(RunConfig(), tmp_path).config["data"]  # what that plan's hash covers
    assert blocked == [] and offline["notes"] == []
    assert data["eval_source"] == data["train_source"] == "shipped"

    monkeypatch.undo()  # sockets work again; the stand-in host answers
    seen: list = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: seen.append(address) or real(address, *a, **k))
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    host = Server()
    host.files = {"zsre_mend_train.json": payload(zsre_records(40, "train")),
                  "zsre_mend_eval.json": payload(zsre_records(30, "eval"))}
    monkeypatch.setenv("EDITBENCH_DATA_URL", host.url)
    try:
        online = plan(tmp_path)
    finally:
        host.close()
    assert seen == [] and host.hits == []
    assert online == offline


def test_asking_for_auto_is_what_probes_the_host(connections, data_host, tmp_path):
    r = runner.invoke(app, ["run", "--dry-run", "--json", "--edits", "8", "--set", "source=auto", "--results", str(tmp_path)],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert connections and "uses the full data" in r.stderr


def _edit(tmp_path: Path, *extra: str) -> dict:
    r = runner.invoke(app, ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "zsre", "--edits", "4",
                            "--no-generation", "--json", "--results", str(tmp_path / "store"),
                            "--cache-dir", str(Path(__file__).parents[2] / "results"), *extra],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_zsre_run_gives_the_same_row_with_and_without_the_data_host(tiny_gpt2, tmp_path, monkeypatch):
    """A real run on the task's default data: sockets disabled, then the data host reachable (--force reruns)."""
    with monkeypatch.context() as m:
        for var in OFFLINE_VARS:
            m.delenv(var, raising=False)
        m.setattr(socket.socket, "connect", lambda self, address: (_ for _ in ()).throw(OSError("no network")))
        m.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
        offline = _edit(tmp_path)
    host = Server()
    host.files = {"zsre_mend_train.json": payload(zsre_records(40, "train")),
                  "zsre_mend_eval.json": payload(zsre_records(30, "eval"))}
    monkeypatch.setenv("EDITBENCH_DATA_URL", host.url)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    try:
        online = _edit(tmp_path, "--force")
    finally:
        host.close()
    assert host.hits == []
    assert online["config_hash"] == offline["config_hash"] and online["config"] == offline["config"]
    assert online["metrics"] == offline["metrics"] and online["model_sha256"] == offline["model_sha256"]
