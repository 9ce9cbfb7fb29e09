"""The retraining pipeline (retraining/): the checked-in spec is current and loads; runs of the
pipeline with kfp.local's SubprocessRunner (each step a real subprocess over real Beam,
TensorFlow and FAISS, as in the project's image) on generated logs:

  1. no served model: the gate passes and says so; towers version 1 and an index naming
     version 1 are published;
  2. a candidate trained (cold) on shuffled clicks, gated on run 1's held-out examples: the gate
     step fails naming both numbers, the tolerance and the split; its numbers are still in the
     run's metrics; the first pair stays the only one served;
  3. the same logs again, warm-started from the served pair: version 2 (the refused candidate
     never took a number) with an index naming 2;

bad input failing the first step with nothing published; the publish step's order and rerun
rules on real staged artifacts, local and in the Cloud Storage emulator; and the submission
requests for Vertex AI and Kubeflow, built offline from k8s/pipelines/retrain.yaml.
"""
import contextlib
import glob
import inspect
import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from ebr import artifacts, config, storage
from retraining.config import RetrainConfig, SubmitConfig, pipeline_arguments

# kfp.local warns that a step's image is not a Python image it knows; the steps run in this
# Python (SubprocessRunner), which has everything the image has.
pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")
ROOT = Path(__file__).resolve().parents[1]
# Small towers and tables (tests/trainer_fixtures.py's TINY), one epoch.
TINY = {"embedding_dim": 16, "feature_dim": 8, "text_dim": 16, "hidden_units": [32],
        "hash_bucket_cap": 2000, "text_char_buckets": 2000, "text_word_buckets": 2000,
        "batch_size": 64, "learning_rate": 0.01, "shuffle_buffer": 2000, "epochs": 1,
        "eval_ks": [10]}
GATE = {"k": 10, "ks": [1, 10, 50], "tolerance": 0.01}


@pytest.fixture(scope="module")
def step_env():
    """The steps are subprocesses of this Python: they import the packages from this checkout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT),
                                                            os.environ.get("PYTHONPATH")) if p))
        yield


@pytest.fixture(scope="module")
def site(tmp_path_factory, step_env):
    """Generated raw logs, a copy whose clicks are random documents, and the served bases."""
    from ebr.cli import main

    root = tmp_path_factory.mktemp("retrain")
    raw = root / "raw"
    assert main(["data", "social", "--out", str(raw), "--documents", "400", "--sessions", "4000",
                 "--seed", "3"]) == 0
    shuffled = root / "raw-shuffled"
    shuffled.mkdir()
    for name in ("searchers.jsonl", "documents.jsonl"):
        shutil.copy(raw / name, shuffled / name)
    docs = [json.loads(line)["doc_id"] for line in (raw / "documents.jsonl").open()]
    rng = random.Random(0)
    with (shuffled / "sessions.jsonl").open("w") as out:
        for line in (raw / "sessions.jsonl").open():
            session = json.loads(line)
            session["clicks"] = [rng.choice(docs) for _ in session["clicks"]]
            session["impressions"] = []  # no click may be outside the impressions
            out.write(json.dumps(session) + "\n")
    return {"root": root, "raw": str(raw), "shuffled": str(shuffled),
            "model_dir": str(root / "served" / "models"), "index_base": str(root / "served" / "index"),
            "work_root": str(root / "work"), "kfp": str(root / "kfp")}


def run(site, raw_logs: str, **settings):
    """One local run; returns (outputs or the failed step's error, the steps' output)."""
    from retraining import pipeline

    cfg = config.from_dict(RetrainConfig, {
        "raw_logs": raw_logs, "model_dir": site["model_dir"], "index_base": site["index_base"],
        "work_root": site["work_root"], "pipeline_root": site["kfp"], "train": TINY,
        "gate": GATE, **settings})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # kfp.local prints each step's output
        try:
            result = pipeline.run_locally(cfg)
        except RuntimeError as e:
            result = e
    return result, printed.getvalue()


def run_dirs(site) -> set[str]:
    return set(storage.listdir(site["work_root"]))


def served_state(site) -> dict:
    """Every version directory (committed or not) of the served bases, and what is beside them."""
    models, index = site["model_dir"], site["index_base"]
    return {"models": storage.listdir(models), "query_tower": storage.listdir(f"{models}/query_tower"),
            "doc_tower": storage.listdir(f"{models}/doc_tower"), "index": storage.listdir(index)}


@pytest.fixture(scope="module")
def first(site):
    result, printed = run(site, site["raw"], warm_start=True)
    assert not isinstance(result, Exception), printed[-4000:]
    (run_dir,) = run_dirs(site)
    return {"outputs": result, "printed": printed,
            "run_dir": storage.join(site["work_root"], run_dir),
            "examples": artifacts.resolve(storage.join(site["work_root"], run_dir, "examples"))}


# --------------------------------------------------------------------------- the spec


def test_checked_in_spec_is_current_and_loads(tmp_path):
    from kfp import components

    from retraining import pipeline

    fresh = pipeline.compile_spec(str(tmp_path / "pipeline.yaml"))
    again = pipeline.compile_spec(str(tmp_path / "again.yaml"))
    text = Path(fresh).read_text()
    assert text == Path(again).read_text()  # deterministic: no timestamps

    def without_sdk_version(t):  # which kfp 2.17.x patch compiled it is not the pipeline
        return re.sub(r"(?m)^sdkVersion: .*$", "", t)

    checked_in = Path(pipeline.SPEC).read_text()
    assert without_sdk_version(checked_in) == without_sdk_version(text), (
        "retraining/pipeline.yaml is stale: regenerate it with `ebr retrain compile`")
    loaded = components.load_component_from_file(pipeline.SPEC)
    assert loaded.name == "ebr-retrain"
    spec = loaded.pipeline_spec
    params = spec.root.input_definitions.parameters
    assert {"raw_logs", "model_dir", "index_base", "work_root", "warm_start", "beam_args",
            "examples", "train", "embed", "index", "gate"} == set(params)
    tasks = spec.root.dag.tasks
    order = ["validate-inputs", "make-examples", "train-candidate", "evaluate-models", "gate",
             "embed-corpus", "build-index", "publish"]
    assert set(tasks) == set(order)
    for before, after in zip(order, order[1:]):  # a chain: nothing runs before the gate decides
        assert before in tasks[after].dependent_tasks, (after, list(tasks[after].dependent_tasks))
    images = {e["container"]["image"] for e in spec.deployment_spec["executors"].values()}
    assert images == {"ebr:0.1.0"}


# --------------------------------------------------------------------------- runs


def test_first_run_passes_the_gate_without_a_served_model_and_publishes_version_1(site, first):
    from index import open_index

    assert first["outputs"] == {"model_version": 1, "index": f"{site['index_base']}/1"}
    assert "gate passed: no served model under" in first["printed"]
    assert served_state(site) == {"models": ["doc_tower", "query_tower"], "query_tower": ["1"],
                                  "doc_tower": ["1"], "index": ["1"]}
    meta = artifacts.read_model_metadata(f"{site['model_dir']}/query_tower/1")
    assert meta["version"] == 1
    searcher = open_index(site["index_base"], model_version=1)  # refuses another model's index
    assert searcher.manifest["model_version"] == 1 and searcher.manifest["dimension"] == meta["dimension"]
    assert searcher.manifest["count"] > 300
    # the candidate, its embeddings and its index were staged in the run, not in the served bases
    for staged in ("candidate/query_tower/1", "candidate/doc_tower/1", "embeddings/1", "index/1",
                   "evaluation.json", "config.json"):
        assert storage.exists(storage.join(first["run_dir"], staged)), staged
    report = storage.read_json(storage.join(first["run_dir"], "evaluation.json"))
    assert report["served"] is None and report["candidate"]["version"] == 1


def _evaluate_outputs(site) -> list[dict]:
    found = []
    for path in glob.glob(os.path.join(site["kfp"], "*", "evaluate-models", "executor_output.json")):
        out = json.loads(Path(path).read_text())
        plot = out["artifacts"]["plot"]["artifacts"][0]["uri"]
        found.append({"metrics": out["artifacts"]["metrics"]["artifacts"][0]["metadata"],
                      "plot": Path(plot).read_text(), "report": out["parameterValues"]["Output"]})
    return found


def test_worse_candidate_stops_at_the_gate_and_the_first_pair_stays_served(site, first):
    before = served_state(site)
    runs_before = run_dirs(site)
    result, printed = run(site, site["shuffled"], warm_start=False,
                          gate={**GATE, "eval_data": first["examples"]})
    # The run ends with the gate step's own message (not only kfp.local's "task failed").
    assert isinstance(result, RuntimeError) and str(result).startswith("gate step: "), \
        printed[-4000:]
    m = re.search(r"gate step: the candidate \(version 2\) reaches recall@10 = (0\.\d+), below the "
                  r"served model's \(version 1\) (0\.\d+) minus the tolerance 0\.0100 "
                  r"\(= 0\.\d+\), on the held-out split of (\S+) \((\d+) examples in "
                  r"eval/examples-\*\.tfrecord\.gz; .*method=hash.*\); the run stops before "
                  r"embedding and nothing is published", str(result))
    assert m, str(result)
    candidate, served = float(m.group(1)), float(m.group(2))
    assert candidate < served - 0.01 and m.group(3) == first["examples"]
    assert served_state(site) == before  # no new version directory, committed or not
    (run_dir,) = run_dirs(site) - runs_before
    run_dir = storage.join(site["work_root"], run_dir)
    assert not storage.exists(storage.join(run_dir, "embeddings"))  # stopped before embedding
    report = storage.read_json(storage.join(run_dir, "evaluation.json"))
    assert report["split"]["examples"] == first["examples"]
    assert (report["candidate"]["version"], report["served"]["version"]) == (2, 1)
    # the refused candidate's numbers and plot are in the run (the evaluate step's artifacts)
    (refused,) = [o for o in _evaluate_outputs(site) if o["metrics"]["gate_passed"] == 0.0]
    assert refused["metrics"]["candidate_recall_at_10"] == pytest.approx(candidate, abs=1e-4)
    assert refused["metrics"]["served_recall_at_10"] == pytest.approx(served, abs=1e-4)
    assert refused["metrics"]["gate_delta_recall_at_10"] < -0.01
    assert "data:image/png;base64," in refused["plot"] and "gate failed" in refused["plot"]


def test_next_run_warm_starts_from_the_served_pair_and_publishes_version_2(site, first):
    from index import open_index

    result, printed = run(site, site["raw"], warm_start=True, gate={**GATE, "tolerance": 0.1})
    assert not isinstance(result, Exception), printed[-4000:]
    assert result == {"model_version": 2, "index": f"{site['index_base']}/2"}
    assert "warm-started from the served pair" in printed and "gate passed: candidate" in printed
    assert storage.listdir(f"{site['model_dir']}/query_tower") == ["1", "2"]
    meta = artifacts.read_model_metadata(f"{site['model_dir']}/query_tower/2")
    assert meta["training"]["warm_start"]["version"] == 1
    assert open_index(site["index_base"]).manifest["model_version"] == 2


def test_candidate_is_numbered_after_the_served_pair(site, first, tmp_path):
    from retraining.steps import candidate_config

    args = {"examples_uri": first["examples"], "run_dir": str(tmp_path), "train": TINY}
    served = site["model_dir"]
    newest = artifacts.newest(f"{served}/query_tower")
    warm = candidate_config(model_dir=served, warm_start=True, **args)
    assert (warm.version, warm.warm_start, warm.warm_start_version) == (
        artifacts.next_version(f"{served}/query_tower", f"{served}/doc_tower"), served, newest)
    assert warm.model_dir == f"{tmp_path}/candidate" and warm.data_dir == first["examples"]
    cold = candidate_config(model_dir=served, warm_start=False, **args)
    assert (cold.warm_start, cold.warm_start_version) == ("", 0)
    empty = candidate_config(model_dir=str(tmp_path / "none"), warm_start=True, **args)
    assert (empty.version, empty.warm_start) == (1, "")


# --------------------------------------------------------------------------- publishing


def _staged(first) -> dict:
    return {"candidate": storage.join(first["run_dir"], "candidate"), "version": 1,
            "staged_index": storage.join(first["run_dir"], "index", "1")}


def test_publish_puts_towers_then_index_and_a_rerun_keeps_the_towers(first, tmp_path):
    from retraining.publish import publish_pair

    models, index = str(tmp_path / "models"), str(tmp_path / "index")
    out = publish_pair(**_staged(first), model_dir=models, index_base=index)
    assert out["model_version"] == 1 and out["index"] == f"{index}/1"
    towers_commit = {t: artifacts.read_commit(f"{models}/{t}/1") for t in artifacts.TOWERS}
    manifest = json.loads(Path(index, "1", "manifest.json").read_text())
    assert manifest["model_version"] == 1 and manifest["version"] == 1
    # a rerun after a kill between the towers and the index: the towers stay as they are
    again = publish_pair(**_staged(first), model_dir=models, index_base=index)
    assert again["index"] == f"{index}/2"
    assert {t: artifacts.read_commit(f"{models}/{t}/1") for t in artifacts.TOWERS} == towers_commit
    # another publisher took the number, or went past it: refused before any write
    other = str(tmp_path / "other")
    staged_towers = {t: storage.join(first["run_dir"], "candidate", t, "1") for t in artifacts.TOWERS}
    artifacts.publish_towers(staged_towers, other, version=3)
    with pytest.raises(artifacts.ArtifactError, match=r"version\(s\) \[3\] above the candidate's 1"):
        publish_pair(**_staged(first), model_dir=other, index_base=str(tmp_path / "other-index"))
    foreign = tmp_path / "foreign"
    (foreign / "query_tower" / "1").mkdir(parents=True)
    (foreign / "doc_tower").mkdir()
    (foreign / "query_tower" / "1" / "saved_model.pb").write_bytes(b"another model")
    with pytest.raises(artifacts.ArtifactError, match="is not this run's candidate"):
        publish_pair(**_staged(first), model_dir=str(foreign), index_base=str(tmp_path / "fi"))
    assert not (tmp_path / "other-index").exists() and not (tmp_path / "fi").exists()


def test_publish_from_and_to_the_bucket(first, gcs_root):
    """Staged artifacts on gs:// are copied down for the upload; the served bases on gs://."""
    from index import open_index
    from retraining.publish import publish_pair

    staged = _staged(first)
    remote = f"{gcs_root}/run"
    for t in artifacts.TOWERS:
        artifacts.publish_dir(storage.join(staged["candidate"], t, "1"), f"{remote}/candidate/{t}",
                              version=1)
    artifacts.publish_dir(staged["staged_index"], f"{remote}/index", version=1)
    out = publish_pair(candidate=f"{remote}/candidate", version=1, staged_index=f"{remote}/index/1",
                       model_dir=f"{gcs_root}/models", index_base=f"{gcs_root}/index")
    assert out == {"model_version": 1, "index": f"{gcs_root}/index/1",
                   "towers": {t: f"{gcs_root}/models/{t}/1" for t in artifacts.TOWERS}}
    for t in artifacts.TOWERS:
        artifacts.verify(f"{gcs_root}/models/{t}/1", checksums=True)
    assert open_index(f"{gcs_root}/index", model_version=1).manifest["version"] == 1


# --------------------------------------------------------------------------- bad input


def test_missing_raw_logs_fail_the_first_step_and_nothing_is_published(tmp_path, step_env,
                                                                      capsys):
    from ebr.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["retrain", "run", "--raw-logs", str(tmp_path / "nope"), "--model-dir",
                     str(tmp_path / "models"), "--index-base", str(tmp_path / "index"),
                     "--work-root", str(tmp_path / "work"), "--pipeline-root", str(tmp_path / "kfp")])
    assert code == 1
    assert (f"validate-inputs step: raw logs {tmp_path / 'nope'} do not exist (raw_logs)"
            in printed.getvalue()), printed.getvalue()[-3000:]
    # The command's last line is the step's own message.
    assert (f"ebr retrain run: validate-inputs step: raw logs {tmp_path / 'nope'} do not exist"
            in capsys.readouterr().err)
    assert "make-examples" not in printed.getvalue()
    for made in ("models", "index", "work"):  # nothing served, nothing staged
        assert not (tmp_path / made).exists(), made


def test_a_bad_setting_given_to_the_pipeline_fails_the_first_step(site, tmp_path):
    """A run parameter edited by hand (e.g. in the Vertex AI console) is checked in the step."""
    from kfp import local

    from retraining import pipeline

    cfg = config.from_dict(RetrainConfig, {
        "raw_logs": site["raw"], "work_root": str(tmp_path / "work"),
        "model_dir": str(tmp_path / "models"), "index_base": str(tmp_path / "index")})
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(RuntimeError, match="validate-inputs"):
        pipeline.build()(**{**pipeline_arguments(cfg), "train": {"epochz": 3}})
    assert ("validate-inputs step: train: unknown key(s) ['epochz'] for TrainConfig"
            in printed.getvalue()), printed.getvalue()[-3000:]
    for made in ("models", "index", "work"):
        assert not (tmp_path / made).exists(), made


def test_stage_settings_are_checked_when_configured():
    base = {"raw_logs": "r", "model_dir": "m", "index_base": "i", "work_root": "w"}
    with pytest.raises(ValueError, match=r"train: unknown key\(s\) \['epochz'\]"):
        config.from_dict(RetrainConfig, {**base, "train": {"epochz": 3}})
    with pytest.raises(ValueError, match=r"\['model_dir'\] are set by the pipeline"):
        config.from_dict(RetrainConfig, {**base, "train": {"model_dir": "elsewhere"}})
    with pytest.raises(ValueError, match="shards=2"):
        config.from_dict(RetrainConfig, {**base, "index": {"shards": 2}})
    typed = config.from_dict(RetrainConfig, {**base, "train": {"epochs": "3",
                                                               "loss": {"temperature": "0.1"}}})
    assert typed.train["epochs"] == 3 and typed.train["loss"]["temperature"] == 0.1


# --------------------------------------------------------------------------- submission


def test_submission_requests_build_offline_from_the_deployment_config():
    import kfp
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    from retraining import pipeline, submit

    cfg = config.from_dict(SubmitConfig, config.read_file(str(ROOT / "k8s/pipelines/retrain.yaml")))
    assert cfg.image == "REGION-docker.pkg.dev/YOUR_PROJECT/ebr/ebr:0.1.0"
    job = submit.vertex_job(cfg, pipeline.SPEC, credentials=AnonymousCredentials())
    body = job._gca_resource
    assert body.runtime_config.gcs_output_directory == "gs://YOUR_BUCKET/ebr/retrain/kfp"
    values = dict(body.runtime_config.parameter_values)
    assert values["model_dir"] == "gs://YOUR_BUCKET/ebr/models" and values["warm_start"] is True
    assert dict(values["train"]) == {"epochs": 3, "batch_size": 512}
    schedule = submit.vertex_schedule_args(cfg)
    assert schedule["cron"] == "0 3 * * *" and schedule["max_concurrent_run_count"] == 1
    inspect.signature(aiplatform.PipelineJob.create_schedule).bind(job, **schedule)

    kf = submit.kubeflow_run_args(cfg, pipeline.SPEC, "experiment-id")
    assert kf["cron_expression"] == "0 0 3 * * *"  # Kubeflow's cron has a seconds field
    assert kf["params"] == pipeline_arguments(cfg) and kf["enable_caching"] is False
    inspect.signature(kfp.Client.create_recurring_run).bind(None, **kf)

    local = config.from_dict(SubmitConfig, {**config.read_file(str(ROOT / "k8s/pipelines/retrain.yaml")),
                                            "model_dir": "/var/models"})
    with pytest.raises(ValueError, match=r"\['model_dir'\] are local paths"):
        submit.vertex_job(local, pipeline.SPEC, credentials=AnonymousCredentials())
    tz = config.from_dict(SubmitConfig, {**config.read_file(str(ROOT / "k8s/pipelines/retrain.yaml")),
                                         "schedule": {"time_zone": "Europe/Paris"}})
    assert submit.cron_expression(tz, "vertex") == "TZ=Europe/Paris 0 3 * * *"
    with pytest.raises(ValueError, match="UTC"):
        submit.cron_expression(tz, "kubeflow")


def test_submit_dry_run_prints_the_request(capsys):
    from ebr.cli import main

    for target in ("vertex", "kubeflow"):
        assert main(["retrain", "submit", "--config", str(ROOT / "k8s/pipelines/retrain.yaml"), "--dry-run",
                     "--target", target]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["target"] == target and "created" not in printed
