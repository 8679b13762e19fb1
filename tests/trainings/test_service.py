"""TrainingService: refusals name the field and leave no job; a created training is a queued train_lora job with
the contract's payload; owners and admins see it; stop, resume from the saved state, and the registration of a
succeeded training's LoRAs as the owner's private models, once."""

from __future__ import annotations

import json
import time

import pytest

from deploy.jobkinds import TRAIN_LORA
from tests.trainings.conftest import ENDPOINT, dataset_of, job_count, lora_files, user
from webapp.records import JobStatus, ModelType
from webapp.services.errors import Conflict, InvalidInput, NotFound


def _create(tstudio, actor, **overrides):
    values = {"base_type": "sd15", "base_model": "tiny-sd15", "dataset_id": dataset_of(tstudio, actor).id,
              "config": {"network_dim": 4, "max_train_epochs": 2}, "output_name": "mylora", "endpoint": ENDPOINT}
    values.update(overrides)
    return tstudio.trainings.create(actor=actor, **values)


def _wait(tstudio, actor, job_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = tstudio.trainings.get(actor=actor, job_id=job_id)
        if job.status in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} is still {job.status}")


@pytest.mark.parametrize(("overrides", "field", "message"), [
    ({"dataset_id": "no-such-dataset"}, "dataset_id", "no dataset"),
    ({"dataset_id": "BOBS"}, "dataset_id", "no dataset"),
    ({"base_type": "sdxl"}, "base_model", "not sdxl"),
    ({"base_type": "sd3"}, "base_type", "sd15, sdxl"),
    ({"base_model": "tinylora"}, "base_model", "no checkpoint"),
    ({"base_model": "nothing-like-it"}, "base_model", "no checkpoint"),
    ({"config": {"network_dim": 0, "bogus_key": 1}}, "config.network_dim", "bogus_key: unknown key"),
    ({"config": "network_dim = \n"}, "config", "not valid TOML"),
    ({"config": {"train_data_dir": "/etc"}}, "config.train_data_dir", "set by the studio"),
    ({"output_name": "../escape"}, "output_name", "letters, digits"),
    ({"output_name": "a b"}, "output_name", "letters, digits"),
])
def test_refusals_name_the_field_and_leave_no_job(tstudio, overrides, field, message):
    alice, bob = user(tstudio, "alice"), user(tstudio, "bob")
    if overrides.get("dataset_id") == "BOBS":
        overrides = {**overrides, "dataset_id": dataset_of(tstudio, bob, "bobs private").id}
    with pytest.raises(InvalidInput) as caught:
        _create(tstudio, alice, **overrides)
    assert caught.value.field == field
    assert message in caught.value.message
    assert job_count(tstudio) == 0


def test_a_dataset_shared_by_another_user_can_be_trained_on(tstudio):
    alice, bob = user(tstudio, "alice"), user(tstudio, "bob")
    shared = dataset_of(tstudio, bob, "bobs shared", visibility="everyone")
    job = _create(tstudio, alice, dataset_id=shared.id)  # anyone who sees a dataset may train on it
    assert job.request["dataset_prefix"] == f"datasets/{shared.id}/"


def test_create_queues_a_train_lora_job_with_the_contract_payload(tstudio):
    alice = user(tstudio, "alice")
    dataset = dataset_of(tstudio, alice)
    job = _create(tstudio, alice, config="network_dim = 4\nmax_train_epochs = 2\nxformers = true\n")
    assert (job.kind, str(job.mode), job.status, job.endpoint) == (TRAIN_LORA, "train", JobStatus.QUEUED, ENDPOINT)
    payload = job.request
    assert set(payload) == {"base_type", "config", "dataset_id", "dataset_prefix", "output_name", "base_model_name"}
    assert payload["base_type"] == "sd15" and payload["dataset_id"] == dataset.id
    assert payload["dataset_prefix"] == f"datasets/{dataset.id}/" and payload["base_model_name"] == "tiny-sd15"
    assert payload["output_name"] == "mylora" and payload["config"]["output_name"] == "mylora"
    assert payload["config"]["network_dim"] == 4 and payload["config"]["resolution"] == 512
    assert "xformers" not in payload["config"]  # ignored kohya keys are warnings, not part of the run
    checkpoint = tstudio.models.checkpoint
    assert job.models["checkpoint"]["sha256"] == checkpoint.sha256
    assert job.models["checkpoint"]["file"]["store_key"] == checkpoint.store_key
    by_id = _create(tstudio, alice, base_model=checkpoint.id, output_name=None)
    assert by_id.request["output_name"] == "lora"  # the config's default name


def test_list_get_and_stop_follow_the_job_rules(tstudio):
    alice, bob, admin = user(tstudio, "alice"), user(tstudio, "bob"), tstudio.admin
    job = _create(tstudio, alice)
    assert [j.id for j in tstudio.trainings.list_trainings(actor=alice)[0]] == [job.id]
    assert tstudio.trainings.list_trainings(actor=bob) == ([], 0)
    assert [j.id for j in tstudio.trainings.list_trainings(actor=admin)[0]] == [job.id]
    with pytest.raises(NotFound):
        tstudio.trainings.get(actor=bob, job_id=job.id)
    with pytest.raises(NotFound):
        tstudio.trainings.stop(actor=bob, job_id=job.id)
    generation = tstudio.jobs.submit(actor=alice, mode="txt2img", request={"prompt": "x", "steps": 1, "width": 64,
                                                                          "height": 64})
    with pytest.raises(NotFound):  # a generation job is not a training
        tstudio.trainings.get(actor=alice, job_id=generation.id)
    stopped = tstudio.trainings.stop(actor=alice, job_id=job.id)
    assert stopped.status == JobStatus.CANCELLED
    with pytest.raises(Conflict, match="saved no epoch"):
        tstudio.trainings.resume(actor=alice, job_id=job.id)
    tstudio.trainings.delete(actor=alice, job_id=job.id)
    assert tstudio.trainings.list_trainings(actor=alice) == ([], 0)


def test_a_stopped_training_resumes_from_its_saved_state(tstudio):
    alice, bob = user(tstudio, "alice"), user(tstudio, "bob")
    tstudio.trainer.hold = True
    tstudio.dispatcher.resume()
    job = _create(tstudio, alice)
    assert tstudio.trainer.saved.wait(20)
    tstudio.trainings.stop(actor=alice, job_id=job.id)
    stopped = _wait(tstudio, alice, job.id, {JobStatus.CANCELLED})
    assert tstudio.trainings.resumable(stopped)
    assert stopped.metrics["latest"]["loss"] == 0.5
    with pytest.raises(NotFound):
        tstudio.trainings.resume(actor=bob, job_id=job.id)
    tstudio.trainer.hold = False
    # a refused resume (this endpoint runs no training) copies nothing and leaves nothing behind
    before = _stored_keys(tstudio)
    with pytest.raises(Conflict) as refused:
        tstudio.trainings.resume(actor=alice, job_id=job.id, endpoint="local")
    assert refused.value.field == "endpoint" and _stored_keys(tstudio) == before
    resumed = tstudio.trainings.resume(actor=alice, job_id=job.id)
    assert resumed.id != job.id and resumed.request == stopped.request
    carried = [f"jobs/{resumed.id}/lora/mylora-000001.safetensors", f"jobs/{resumed.id}/samples/mylora-e000001-00.png"]
    assert resumed.artifact_keys == carried, "the epochs made before the stop are the resumed job's from the start"
    done = _wait(tstudio, alice, resumed.id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert tstudio.trainer.state_at_start[job.id] is None
    assert tstudio.trainer.state_at_start[resumed.id] == b"state after epoch 1"  # there before it could start
    assert done.artifact_keys == [*carried, f"jobs/{resumed.id}/lora/mylora-000002.safetensors",
                                  f"jobs/{resumed.id}/samples/mylora-e000002-00.png",
                                  f"jobs/{resumed.id}/lora/mylora.safetensors"]
    with pytest.raises(Conflict, match="succeeded"):
        tstudio.trainings.resume(actor=alice, job_id=resumed.id)
    # the resumed training's LoRAs are every epoch's, each registered once, as alice's
    tstudio.training_registrar.wait(30)
    done = tstudio.trainings.get(actor=alice, job_id=resumed.id)
    with tstudio.trainings.artifact(actor=alice, job_id=resumed.id, key=carried[0]) as handle:
        assert handle.read() == _read(tstudio, stopped.artifact_keys[0])  # the stopped job keeps its own copy
    assert done.stored_bytes == len(done.request_json.encode()) + sum(
        blob.size for blob in tstudio.store.list(f"jobs/{resumed.id}/")), "what the job holds counts once"
    registered = done.info["registered_models"]
    assert set(registered) == {k for k in done.artifact_keys if k.endswith(".safetensors")}
    models = [m for m in tstudio.registry.list_models(actor=alice, type=ModelType.LORA) if m.source == "training"]
    assert sorted(m.name for m in models) == ["mylora", "mylora-000001", "mylora-000002"]
    assert sorted(m.id for m in models) == sorted(registered.values())
    assert "registered_models" not in (tstudio.trainings.get(actor=alice, job_id=job.id).info or {})


def test_a_registered_lora_is_stored_and_counted_once_whichever_is_deleted_first(tstudio):
    carol = user(tstudio, "carol")
    tstudio.dispatcher.resume()
    job = _create(tstudio, carol, output_name="quotalora")
    assert _wait(tstudio, carol, job.id, {JobStatus.SUCCEEDED, JobStatus.FAILED}).status == JobStatus.SUCCEEDED
    tstudio.training_registrar.wait(30)
    done = tstudio.trainings.get(actor=carol, job_id=job.id)
    registered = done.info["registered_models"]
    final, epoch = f"jobs/{job.id}/lora/quotalora.safetensors", f"jobs/{job.id}/lora/quotalora-000001.safetensors"
    assert set(registered) == {final, epoch} and sorted(done.info["handed_to_models"]) == sorted(registered)
    assert not tstudio.store.exists(final) and not tstudio.store.exists(epoch), "the models hold the only copies"
    assert _used(tstudio, carol) == _really_stored(tstudio, carol)
    with tstudio.trainings.artifact(actor=carol, job_id=job.id, key=final) as handle:  # served from the model
        assert handle.read() == lora_files().final.read_bytes()
    # the model goes first: what is counted and what is stored go down together; the training says where it went
    tstudio.registry.delete(actor=carol, model_id=registered[epoch])
    assert _used(tstudio, carol) == _really_stored(tstudio, carol)
    with pytest.raises(NotFound, match="gone"):
        tstudio.trainings.artifact(actor=carol, job_id=job.id, key=epoch)
    # then the job: the final model and its bytes stay
    tstudio.trainings.delete(actor=carol, job_id=job.id)
    assert _used(tstudio, carol) == _really_stored(tstudio, carol) > 0
    kept = tstudio.registry.get(actor=carol, model_id=registered[final])
    with tstudio.store.open(kept.store_key) as handle:
        assert handle.read() == lora_files().final.read_bytes()


def _used(tstudio, owner) -> int:
    return tstudio.quota.usage(actor=owner).used


def _really_stored(tstudio, owner) -> int:
    """What ``owner`` holds, measured: jobs' stored requests and files, model files and dataset files."""
    def blobs(prefix: str) -> int:
        return sum(blob.size for blob in tstudio.store.list(prefix))

    jobs = tstudio.jobs.list_jobs(actor=owner, limit=None)[0]
    models = [m for m in tstudio.registry.list_models(actor=owner) if m.owner_id == owner.id and m.store_key]
    datasets = [d for d in tstudio.datasets.list_datasets(actor=owner) if d.owner_id == owner.id]
    return (sum(len(j.request_json.encode()) + blobs(f"jobs/{j.id}/") for j in jobs)
            + sum(tstudio.store.stat(m.store_key).size for m in models)
            + sum(blobs(f"datasets/{d.id}/") for d in datasets))


def _stored_keys(tstudio) -> set[str]:
    return {blob.key for blob in tstudio.store.list("jobs/")}


def _read(tstudio, key: str) -> bytes:
    with tstudio.store.open(key) as handle:
        return handle.read()


def test_a_succeeded_training_registers_its_loras_once_as_the_owners_private_models(tstudio):
    alice, bob = user(tstudio, "alice"), user(tstudio, "bob")
    tstudio.dispatcher.resume()
    job = _create(tstudio, alice, output_name="catlora")
    done = _wait(tstudio, alice, job.id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    assert done.status == JobStatus.SUCCEEDED, done.error
    tstudio.training_registrar.wait(30)
    registered = tstudio.trainings.get(actor=alice, job_id=job.id).info["registered_models"]
    assert set(registered) == {f"jobs/{job.id}/lora/catlora.safetensors",
                               f"jobs/{job.id}/lora/catlora-000001.safetensors"}
    models = {m.name: m for m in tstudio.registry.list_models(actor=alice, type=ModelType.LORA)
              if m.source == "training"}
    assert set(models) == {"catlora", "catlora-000001"}
    for model in models.values():
        assert model.owner_id == alice.id and model.visibility.value == "private"
        assert job.id in model.description and model.id in registered.values()
    assert json.loads(models["catlora"].metadata_json)["training"]["final"] is True
    assert json.loads(models["catlora-000001"].metadata_json)["training"]["epoch"] == 1
    summary = json.loads(models["catlora"].metadata_json)["summary"]  # training.metadata.summary of the file
    assert summary["network_dim"] == 4 and summary["modules"] > 0
    assert not [m for m in tstudio.registry.list_models(actor=bob, type=ModelType.LORA) if m.source == "training"]
    # again, by hand and by the start-up sweep: nothing new
    assert tstudio.training_registrar.register(job.id) == registered
    assert tstudio.training_registrar.sweep() == []
    assert len([m for m in tstudio.registry.list_models(actor=alice, type=ModelType.LORA)
                if m.source == "training"]) == 2
    # a LoRA the owner deleted is not brought back, and the job's deletion keeps the models
    tstudio.registry.delete(actor=alice, model_id=models["catlora-000001"].id)
    tstudio.trainings.delete(actor=alice, job_id=job.id)
    assert tstudio.training_registrar.sweep() == []
    assert [m.name for m in tstudio.registry.list_models(actor=alice, type=ModelType.LORA)
            if m.source == "training"] == ["catlora"]
    tstudio.registry.delete(actor=alice, model_id=models["catlora"].id)


def test_the_start_up_sweep_registers_a_training_that_finished_while_the_studio_was_down(tstudio, monkeypatch):
    alice = user(tstudio, "alice")
    # the studio stops before the observer runs: the job is recorded, its LoRAs are not registered
    monkeypatch.setattr(tstudio.training_registrar, "job_finished", lambda finished: None)
    tstudio.dispatcher.resume()
    job = _create(tstudio, alice, output_name="sweptlora")
    _wait(tstudio, alice, job.id, {JobStatus.SUCCEEDED})
    tstudio.training_registrar.wait(30)
    assert "registered_models" not in tstudio.trainings.get(actor=alice, job_id=job.id).info
    assert tstudio.training_registrar.sweep() == [job.id]
    names = sorted(m.name for m in tstudio.registry.list_models(actor=alice, type=ModelType.LORA)
                   if m.source == "training")
    assert names == ["sweptlora", "sweptlora-000001"]
    for model in tstudio.registry.list_models(actor=alice, type=ModelType.LORA):
        if model.source == "training":
            tstudio.registry.delete(actor=alice, model_id=model.id)


def test_format_config_and_defaults(tstudio):
    text, warnings = tstudio.trainings.format_config("network_dim = 8\nxformers = true\n", "sdxl")
    assert "network_dim = 8" in text and "resolution = 1024" in text and "clip_skip" not in text
    assert warnings == ["xformers: ignored (kohya setting the studio does not use)"]
    with pytest.raises(InvalidInput) as caught:
        tstudio.trainings.format_config("clip_skip = 2\nnope = 1\n", "sdxl")
    assert caught.value.field == "config.nope" and "clip_skip: is for SD1.5 only" in caught.value.message
    assert tstudio.trainings.defaults("sd15")["resolution"] == 512
    with pytest.raises(InvalidInput):
        tstudio.trainings.defaults("sd2")


def test_files_are_read_by_artifact_key_only(tstudio):
    alice, bob = user(tstudio, "alice"), user(tstudio, "bob")
    tstudio.dispatcher.resume()
    job = _create(tstudio, alice)
    done = _wait(tstudio, alice, job.id, {JobStatus.SUCCEEDED})
    sample_key = f"jobs/{job.id}/samples/mylora-e000001-00.png"
    with tstudio.trainings.artifact(actor=alice, job_id=job.id, key=sample_key) as handle:
        assert handle.read()[:4] == b"\x89PNG"
    with tstudio.trainings.artifact(actor=alice, job_id=job.id, key=done.info["lora"]) as handle:
        assert len(handle.read()) > 100
    for key in (f"jobs/{job.id}/state/state.pt", "datasets/x/1_a/a.png", f"jobs/{job.id}/../other/x.png"):
        with pytest.raises(NotFound):
            tstudio.trainings.artifact(actor=alice, job_id=job.id, key=key)
    with pytest.raises(NotFound):
        tstudio.trainings.artifact(actor=bob, job_id=job.id, key=sample_key)
    assert [key for key, _ in tstudio.trainings.samples(actor=alice, job_id=job.id)] == [sample_key]
