"""Where the task data comes from: the full public files (downloaded, cached, pinned), `hf:` datasets, size checks.

Downloads are tested against a localhost HTTP server started here (`EDITBENCH_DATA_URL` points at
it); nothing touches the network. Every check runs through `bench.runner.resolve.resolve` or the CLI, i.e.
before any model loads.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.core.cachefs import CacheWarning
from bench.core.config import RunConfig
from bench.results.variants import data_id, variant_diff
from bench.runner.download import entry_dir, pin_path
from bench.runner.download import main as download_main
from bench.runner.run import UserError, resolve
from tasks.base import DATA_DIR, read_records
from tasks.counterfact import CounterFact
from tasks.zsre import Zsre

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


# -- fake public files ------------------------------------------------------------------------


def zsre_records(n: int, tag: str) -> list[dict]:
    """MEND-format zsRE records with distinct questions."""
    return [{"subject": f"S{tag}{i}", "src": f"What is {tag} thing {i}?", "answers": [f"ans {i}"],
             "alt": f"alt {i}", "rephrase": f"Which is {tag} thing {i}?", "loc": f"nq question: who is {tag} {i}",
             "loc_ans": f"person {i}", "pred": "x", "cond": "x"} for i in range(n)]


SHIPPED_TRAIN_IDS = [r["case_id"] for r in read_records(DATA_DIR / "counterfact" / "counterfact-train.json")][:6]
SHIPPED_VAL_IDS = [r["case_id"] for r in read_records(DATA_DIR / "counterfact" / "counterfact-val.json")][:4]


def rome_records() -> list[dict]:
    """ROME-schema CounterFact cases: 6 with case ids of the shipped train file, 4 of the val file, 3 others."""
    ids = SHIPPED_TRAIN_IDS + SHIPPED_VAL_IDS + [999_000, 999_001, 999_002]
    return [{"case_id": c,
             "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": f"Person {c}",
                                   "target_new": {"str": "English"}, "target_true": {"str": "French"}},
             "paraphrase_prompts": [f"Person {c} grew up speaking"],
             "neighborhood_prompts": [f"Neighbour {c} is a native speaker of"],
             "attribute_prompts": [], "generation_prompts": []} for c in ids]


def payload(records: list[dict]) -> bytes:
    return json.dumps(records).encode()


class Server:
    """A localhost HTTP server: `files` maps a name to bytes; `truncate` names files cut short (full Content-Length)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                name = self.path.rsplit("/", 1)[-1]
                outer.hits.append(name)
                if name not in outer.files:
                    self.send_error(404)
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in outer.truncate else body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/dsets"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch) -> Iterator[Server]:
    """The fake data root, online: offline variables lifted for this test."""
    s = Server()
    s.files = {"zsre_mend_train.json": payload(zsre_records(40, "train")),
               "zsre_mend_eval.json": payload(zsre_records(30, "eval")),
               "counterfact.json": payload(rome_records())}
    for var in ("EDITBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EDITBENCH_DATA_URL", s.url)
    yield s
    s.close()


def zsre_cfg(**kw) -> RunConfig:
    base = {"editor": "ft", "model": "tiny-gpt2", "task": "zsre", "n_edits": 4, "device": "cpu"}
    return RunConfig(**{**base, **kw})


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- 1. downloads: cache, reuse, pins, truncation ---------------------------------------------


def test_full_zsre_is_downloaded_once_recorded_and_reused(server, tmp_path):
    res = resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    data = res.config["data"]
    assert (len(res.task.train_split()), len(res.task.eval_split())) == (40, 30)
    assert data["eval_source"] == data["train_source"] == "full"
    assert data["eval_path"] == "zsre_mend_eval.json" and data["train_path"] == "zsre_mend_train.json"
    assert data["eval_sha256"] == sha(server.files["zsre_mend_eval.json"])
    assert data["train_sha256"] == sha(server.files["zsre_mend_train.json"])
    assert data["eval_url"] == "https://rome.baulab.info/data/dsets/zsre_mend_eval.json"
    assert "source" not in res.config["task_config"]
    assert sum("downloaded" in n and "sha256" in n for n in res.notes) == 2
    assert sorted(server.hits) == ["zsre_mend_eval.json", "zsre_mend_train.json"]
    for name in ("zsre_mend_eval.json", "zsre_mend_train.json"):
        rf = next(f for f in Zsre.full_files if f.name == name)
        assert pin_path(tmp_path, rf).read_text().split()[0] == sha(server.files[name])
        assert (entry_dir(tmp_path, rf) / "cache-entry.json").is_file()

    again = resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    assert len(server.hits) == 2  # reused: no second request
    assert again.config_hash == res.config_hash and not [n for n in again.notes if "downloaded" in n]
    assert [n for n in again.notes if "uses the full data" in n and "40 training / 30 evaluation" in n]
    auto = resolve(zsre_cfg(overrides={"source": "auto"}), tmp_path)  # cached full files win, hash like full
    assert auto.config_hash == res.config_hash and len(server.hits) == 2
    shipped = resolve(zsre_cfg(overrides={"source": "shipped"}), tmp_path)
    assert variant_diff(res.config) == {} and data_id(res.config) != data_id(shipped.config)  # told apart by data


def test_cached_full_files_are_used_offline(server, tmp_path, monkeypatch):
    full = resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    server.close()
    monkeypatch.setenv("EDITBENCH_OFFLINE", "1")
    assert resolve(zsre_cfg(overrides={"source": "auto"}), tmp_path).config_hash == full.config_hash


def test_a_changed_remote_file_is_an_error_and_is_not_cached(server, tmp_path):
    resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    rf = next(f for f in Zsre.full_files if f.name == "zsre_mend_eval.json")
    shutil.rmtree(entry_dir(tmp_path, rf))  # a fresh download is needed ...
    server.files[rf.name] = payload(zsre_records(31, "eval"))  # ... and the server now has other bytes
    with pytest.raises(UserError, match="changed since it was first downloaded") as e:
        resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    assert "\n" not in str(e.value) and str(pin_path(tmp_path, rf)) in str(e.value)
    assert not entry_dir(tmp_path, rf).exists()  # nothing cached
    pin_path(tmp_path, rf).unlink()  # the way out the message names: trust the new file
    assert len(resolve(zsre_cfg(overrides={"source": "full"}), tmp_path).task.eval_split()) == 31


def test_a_tampered_cached_file_is_moved_aside_and_fetched_again_against_the_pin(server, tmp_path):
    resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    rf = next(f for f in Zsre.full_files if f.name == "zsre_mend_eval.json")
    cached = entry_dir(tmp_path, rf) / rf.name
    cached.write_bytes(payload(zsre_records(30, "evil")))
    with pytest.warns(CacheWarning, match="moved aside"):
        res = resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    assert res.config["data"]["eval_sha256"] == sha(server.files[rf.name])  # the pinned bytes, not the tampered
    assert server.hits.count(rf.name) == 2

    # tampered, and the server changed too: nothing with other bytes than the pinned ones is used
    cached.write_bytes(b"[]")
    server.files[rf.name] = payload(zsre_records(29, "eval"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        with pytest.raises(UserError, match="changed since it was first downloaded"):
            resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)


def test_a_replaced_cache_entry_that_disagrees_with_the_pin_is_an_error(server, tmp_path):
    resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    rf = next(f for f in Zsre.full_files if f.name == "zsre_mend_eval.json")
    pin_path(tmp_path, rf).write_text("0" * 64 + "  zsre_mend_eval.json\n")  # a consistent entry, another pin
    with pytest.raises(UserError, match="differs from 0{64}, pinned"):
        resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)


def test_a_truncated_download_is_an_error_and_leaves_nothing(server, tmp_path):
    server.truncate.add("zsre_mend_eval.json")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="truncated") as e:
        resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)
    rf = next(f for f in Zsre.full_files if f.name == "zsre_mend_eval.json")
    assert not entry_dir(tmp_path, rf).exists() and not pin_path(tmp_path, rf).exists()
    assert not list((tmp_path / "data").glob(".zsre_mend_eval*tmp*"))  # no temporary left behind
    server.truncate.clear()  # a retry succeeds
    assert len(resolve(zsre_cfg(overrides={"source": "full"}), tmp_path).task.eval_split()) == 30


@pytest.mark.parametrize("body,match", [(None, "HTTP 404"), (b"<html>maintenance</html>", "not a JSON data file")])
def test_http_errors_and_non_json_bodies_are_errors(server, tmp_path, body, match):
    if body is None:
        del server.files["zsre_mend_eval.json"]
    else:
        server.files["zsre_mend_eval.json"] = body
    with pytest.raises(UserError, match=match):
        resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    rf = next(f for f in Zsre.full_files if f.name == "zsre_mend_eval.json")
    assert not entry_dir(tmp_path, rf).exists() and not pin_path(tmp_path, rf).exists()


def test_only_the_files_a_run_needs_are_downloaded(server, tmp_path):
    own = tmp_path / "own.json"
    own.write_text(json.dumps(zsre_records(5, "own")))
    res = resolve(zsre_cfg(data=str(own), overrides={"source": "full"}), tmp_path / "cache")
    assert server.hits == ["zsre_mend_train.json"]
    assert res.config["data"]["eval_source"] == "user" and res.config["data"]["train_source"] == "full"
    assert "full train split" in res.config["data"]["train_note"]


def test_full_counterfact_is_split_by_the_shipped_train_case_ids(server, tmp_path):
    res = resolve(RunConfig(editor="ft", model="tiny-gpt2", task="counterfact", n_edits=2, device="cpu",
                            overrides={"source": "full"}), tmp_path)
    train, pool = res.task.train_split(), res.task.eval_split()
    assert {r.subject for r in train} == {f"Person {c}" for c in SHIPPED_TRAIN_IDS}
    assert {r.subject for r in pool} == {f"Person {c}" for c in SHIPPED_VAL_IDS + [999_000, 999_001, 999_002]}
    data = res.config["data"]
    assert data["eval_format"] == "rome" and data["eval_path"] == data["train_path"] == "counterfact.json"
    assert "case ids" in data["split"] and server.hits == ["counterfact.json"]  # one file, fetched once


def test_full_counterfact_without_matching_case_ids_cannot_be_split(server, tmp_path):
    recs = rome_records()
    for r in recs:
        r["case_id"] += 5_000_000
    server.files["counterfact.json"] = payload(recs)
    with pytest.raises(UserError, match="no case id matches"):
        resolve(RunConfig(editor="ft", model="tiny-gpt2", task="counterfact", n_edits=2, device="cpu",
                          overrides={"source": "full"}), tmp_path)


def test_download_command_prints_sizes_sha256_and_counts(server, tmp_path, capsys):
    assert download_main(["--task", "zsre", "--cache-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"]["zsre_mend_eval.json"]["sha256"] == sha(server.files["zsre_mend_eval.json"])
    assert out["files"]["zsre_mend_train.json"]["bytes"] == len(server.files["zsre_mend_train.json"])
    assert (out["train_requests"], out["eval_requests"]) == (40, 30)


# -- 2. the default source offline, and a bad source ------------------------------------------


def test_offline_auto_uses_the_shipped_subset_with_a_notice_and_the_old_hash(tmp_path):
    t0 = time.perf_counter()
    res = resolve(zsre_cfg(overrides={"source": "auto"}), tmp_path)  # tests run with EDITBENCH_OFFLINE=1
    assert time.perf_counter() - t0 < 5
    notes = [n for n in res.notes if "shipped subset" in n]
    assert len(notes) == 1 and "400 training / 600 evaluation" in notes[0] and "EDITBENCH_OFFLINE=1" in notes[0]
    shipped = resolve(zsre_cfg(overrides={"source": "shipped"}), tmp_path)
    assert shipped.config_hash == res.config_hash and not [n for n in shipped.notes if "shipped subset" in n]
    assert res.config["data"]["eval_source"] == "shipped" and "source" not in res.config["task_config"]
    assert not (tmp_path / "data").exists()
    assert variant_diff(res.config) == {}  # reports and `bench check` still see today's default


def test_auto_with_an_unreachable_server_falls_back_at_once(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a localhost port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("EDITBENCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("EDITBENCH_DATA_URL", f"http://127.0.0.1:{port}/dsets")
    t0 = time.perf_counter()
    res = resolve(zsre_cfg(overrides={"source": "auto"}), tmp_path)
    assert time.perf_counter() - t0 < 5
    assert any("not reachable" in n and "shipped subset" in n for n in res.notes)
    with pytest.raises(UserError, match="source=full.*cannot be downloaded.*source=shipped"):
        resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)


def test_source_full_offline_and_a_bad_source_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"source=full: .*EDITBENCH_OFFLINE=1"):
        resolve(zsre_cfg(overrides={"source": "full"}), tmp_path)
    with pytest.raises(UserError, match="source must be one of auto, full, shipped"):
        resolve(zsre_cfg(overrides={"source": "everything"}), tmp_path)


# -- 3. hf: datasets ------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """`datasets` writes its arrow cache under tmp_path, not the user's cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def dataset_folder(root: Path, splits: dict[str, list[dict]]) -> Path:
    root.mkdir(parents=True)
    for split, recs in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_hf_local_folder_is_loaded_validated_and_identified_by_content(tmp_path, hf_cache):
    a = dataset_folder(tmp_path / "a", {"train": zsre_records(8, "hf"), "test": zsre_records(6, "hft")})
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    ra, rb = (resolve(zsre_cfg(data=f"hf:{p}@test"), tmp_path) for p in (a, b))
    data = ra.config["data"]
    assert len(ra.task.eval_split()) == 6 and data["eval_source"] == "hf" and data["eval_format"] == "mend"
    assert data["eval_split"] == "test" and data["eval_dataset"] is None
    assert data["eval_revision"].startswith("sha256:") and data["eval_revision"] == f"sha256:{data['eval_sha256']}"
    assert ra.config_hash == rb.config_hash  # by content, not by folder
    (b / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in zsre_records(5, "hft")))
    assert resolve(zsre_cfg(data=f"hf:{b}@test"), tmp_path).config_hash != ra.config_hash
    with pytest.raises(UserError, match="several splits: .*test.*@SPLIT"):
        resolve(zsre_cfg(data=f"hf:{a}"), tmp_path)
    tr = resolve(zsre_cfg(data=f"hf:{a}@test", train_data=f"hf:{a}@train"), tmp_path)
    assert tr.config["data"]["train_source"] == "hf" and len(tr.task.train_split()) == 8


def test_hf_bad_record_names_dataset_record_and_field(tmp_path, hf_cache):
    recs = zsre_records(4, "bad")
    recs[2]["rephrase"] = "  "
    folder = dataset_folder(tmp_path / "bad", {"train": recs})
    with pytest.raises(UserError, match=rf"hf:{folder}, record 2, field 'rephrase': empty string"):
        resolve(zsre_cfg(data=f"hf:{folder}"), tmp_path)
    res = resolve(zsre_cfg(data=f"hf:{folder}", skip_bad=True, n_edits=3), tmp_path)
    assert res.config["data"]["eval_skipped"] == 1 and len(res.task.eval_split()) == 3


def test_hf_hub_id_offline_fails_at_once(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="Hugging Face Hub cannot be used .*EDITBENCH_OFFLINE=1.*not in the local"):
        resolve(zsre_cfg(data="hf:zjunlp/KnowEdit:zsre@train"), tmp_path)
    assert time.perf_counter() - t0 < 5


def test_hf_for_a_task_that_reads_files_only_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="Hugging Face datasets are read for the tasks counterfact, zsre"):
        resolve(RunConfig(editor="ft", model="minilm-fever", task="fever", n_edits=2, device="cpu",
                          data="hf:some/dataset"), tmp_path)


# -- 4. sizes, checked before any model loads ----------------------------------------------


def run_cli(*args: str):
    t0 = time.perf_counter()
    r = runner.invoke(app, ["run", *args], catch_exceptions=False)
    r.seconds = time.perf_counter() - t0
    return r


def test_the_design_cards_512_edits_stop_at_once_with_the_size_message(no_model_load, tmp_path):
    r = run_cli("--editor", "malmen", "--model", "smollm2-135m", "--task", "zsre", "--edits", "512",
                "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    msg = " ".join(r.stderr[r.stderr.index("error:"):].split())
    assert "512 edits per step" in msg and "400 training requests (the shipped subset)" in msg
    assert "--train-data FILE" in msg and "--set source=full" in msg and "--set train_edits=400" in msg
    assert "Traceback" not in r.output and r.seconds < 5
    assert not (tmp_path / "runs.jsonl").exists()


def test_meta_training_sizes(no_model_load, tmp_path):
    ok = resolve(RunConfig(editor="malmen", model="smollm2-135m", task="zsre", n_edits=512, device="cpu",
                           overrides={"train_edits": "400"}), tmp_path)  # the second way out
    assert ok.hparams.train_edits == 400
    resolve(RunConfig(), tmp_path)  # the README's default run (malmen, smollm2-135m, zsre, 32 edits)
    resolve(zsre_cfg(n_edits=512), tmp_path)  # fine-tuning does not meta-train
    with pytest.raises(UserError, match="401 edits per step \\(--set train_edits\\)"):
        resolve(RunConfig(editor="mend", model="smollm2-135m", task="zsre", n_edits=8, device="cpu",
                          overrides={"train_edits": "401"}), tmp_path)
    # schedule=select holds out min(n_val, N // 4) = 100 of the 400 for validation
    with pytest.raises(UserError, match="has 300 training requests \\(the shipped subset, less 100 held out"):
        resolve(RunConfig(editor="malmen", model="smollm2-135m", task="zsre", n_edits=301, device="cpu",
                          overrides={"schedule": "select"}), tmp_path)
    resolve(RunConfig(editor="malmen", model="smollm2-135m", task="zsre", n_edits=300, device="cpu",
                      overrides={"schedule": "select"}), tmp_path)


def test_edits_beyond_the_pool_name_the_full_data(no_model_load, tmp_path):
    r = run_cli("--editor", "malmen", "--model", "smollm2-135m", "--task", "zsre", "--edits", "1024",
                "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    msg = " ".join(r.stderr[r.stderr.index("error:"):].split())
    assert "more than the 600 evaluation requests" in msg and "--set source=full" in msg and r.seconds < 5


def test_the_full_data_lifts_the_size_limit(server, tmp_path):
    server.files["zsre_mend_train.json"] = payload(zsre_records(600, "train"))
    res = resolve(RunConfig(editor="malmen", model="smollm2-135m", task="zsre", n_edits=20, device="cpu",
                            overrides={"source": "full", "train_edits": "512"}), tmp_path)
    assert len(res.task.train_split()) == 600
    with pytest.raises(UserError, match="has 600 training requests \\(the full data\\)") as e:
        resolve(RunConfig(editor="malmen", model="smollm2-135m", task="zsre", n_edits=20, device="cpu",
                          overrides={"source": "full", "train_edits": "601"}), tmp_path)
    assert "source=full" not in str(e.value).split("training requests")[1]  # already the full data


def test_tasks_built_directly_stay_on_the_shipped_data():
    assert len(Zsre().eval_split()) == 600 and len(CounterFact().eval_split()) == 1919
    with pytest.raises(ValueError, match="source=full needs the downloaded files"):
        from tasks.zsre import ZsreConfig

        Zsre(ZsreConfig(source="full"))
