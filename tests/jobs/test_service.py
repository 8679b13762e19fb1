"""JobService on the fake backend: submit → run → results, validation, isolation, cancel, OOM, limits; on
SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import time

import pytest

from tests.fixtures.postgres import DATABASE_KINDS
from tests.fixtures.studio_models import build_model_studio
from tests.jobs.conftest import add_user, txt2img
from webapp.records import JobStatus
from webapp.services.errors import Conflict, InvalidInput, NotFound, Throttled


@pytest.fixture(scope="module", params=DATABASE_KINDS)
def fake_studio_database(request) -> str:
    return request.param


def _png_parameters(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.info["parameters"]


def _wait_running(jobs, actor, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while jobs.get(actor=actor, job_id=job_id).status != JobStatus.RUNNING or not (
            jobs.board.live(job_id) and jobs.board.live(job_id).total):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)


def test_submit_runs_to_images_with_infotext_in_the_store(fake_studio):
    jobs, admin = fake_studio.jobs, fake_studio.admin
    job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(batch_size=2, unknown_key="ignored"))
    assert job.status == JobStatus.QUEUED and job.endpoint == "local" and job.checkpoint == "tiny-sd15"
    done = jobs.wait(actor=admin, job_id=job.id, timeout=30)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1
    assert done.image_keys == [f"jobs/{job.id}/0.png", f"jobs/{job.id}/1.png"]
    images = jobs.images(actor=admin, job_id=job.id)
    assert [_png_parameters(png) for png in images] == done.infotexts
    assert "Seed: 8" in done.infotexts[1] and done.info["all_seeds"] == [7, 8]
    assert done.request["unknown_key"] == "ignored", "the request is kept exactly as submitted"
    assert done.started_at >= done.created_at and done.finished_at >= done.started_at


def test_models_resolve_by_title_and_prompt_tags_as_the_submitting_user(fake_studio):
    jobs, admin, models = fake_studio.jobs, fake_studio.admin, fake_studio.models
    request = txt2img(prompt="a fox <lora:tinylora:0.7> tinyemb <hypernet:tinyhyper:0.5> <lora:missing:1>",
                      override_settings={"sd_model_checkpoint": models.checkpoint.title, "sd_vae": "tinyvae",
                                         "CLIP_stop_at_last_layers": 2})
    job = jobs.submit(actor=admin, mode="txt2img", request=request)
    resolved = job.models
    assert resolved["checkpoint"]["sha256"] == models.checkpoint.sha256
    assert resolved["vae"]["name"] == "tinyvae"
    assert set(resolved["loras"]) == {"tinylora"}, "unknown LoRAs are left to the engine to report"
    assert set(resolved["embeddings"]) == {"tinyemb"} and set(resolved["hypernetworks"]) == {"tinyhyper"}
    assert resolved["loras"]["tinylora"]["file"]["sha256"] == models.lora.sha256


@pytest.mark.parametrize(("mode", "request_", "error", "field"), [
    ("txt2img", {"steps": 0}, InvalidInput, "steps"),
    ("txt2img", {"width": 100}, InvalidInput, "width"),
    ("txt2img", {"cfg_scale": "high"}, InvalidInput, "cfg_scale"),
    ("txt2img", {"sampler_name": "Not A Sampler"}, NotFound, "sampler_name"),
    ("txt2img", {"scheduler": "Wobbly"}, InvalidInput, "scheduler"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, NotFound, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"sd_vae": "nope"}}, NotFound, "sd_vae"),
    ("txt2img", {"refiner_checkpoint": "nope"}, NotFound, "refiner_checkpoint"),
    ("txt2img", {"prompt": "<lora::1>"}, InvalidInput, "prompt"),
    ("img2img", {}, InvalidInput, "init_images"),
    ("img2img", {"init_images": ["not base64!"]}, InvalidInput, "init_images[0]"),
    ("outpaint", {}, InvalidInput, "mode"),
])
def test_bad_requests_name_the_field_and_leave_no_job(fake_studio, mode, request_, error, field):
    jobs, admin = fake_studio.jobs, fake_studio.admin
    with pytest.raises(error) as caught:
        jobs.submit(actor=admin, mode=mode, request=txt2img(**request_))
    assert caught.value.field == field
    assert jobs.list_jobs(actor=admin)[1] == 0


def test_unknown_sampler_error_lists_the_valid_ones(fake_studio):
    with pytest.raises(NotFound, match="valid samplers: .*Euler a"):
        fake_studio.jobs.submit(actor=fake_studio.admin, mode="txt2img", request=txt2img(sampler_name="k_nope"))


def test_img2img_with_a_mask_is_an_inpaint_job(fake_studio):
    import base64

    from PIL import Image

    def b64(image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    init, mask = b64(Image.new("RGB", (64, 64), "red")), b64(Image.new("L", (64, 64), 255))
    jobs, admin = fake_studio.jobs, fake_studio.admin
    plain = jobs.submit(actor=admin, mode="img2img", request=txt2img(init_images=[init], mask=None))
    masked = jobs.submit(actor=admin, mode="img2img", request=txt2img(init_images=[init], mask=mask))
    assert (plain.mode, masked.mode) == ("img2img", "inpaint")
    assert jobs.wait(actor=admin, job_id=masked.id, timeout=30).status == JobStatus.SUCCEEDED


def test_two_users_see_only_their_own_jobs_and_images(fake_studio):
    jobs = fake_studio.jobs
    alice, bob = add_user(fake_studio, "alice"), add_user(fake_studio, "bob")
    mine = jobs.submit(actor=alice, mode="txt2img", request=txt2img())
    jobs.wait(actor=alice, job_id=mine.id, timeout=30)
    for call in (lambda: jobs.get(actor=bob, job_id=mine.id),
                 lambda: jobs.image(actor=bob, job_id=mine.id, index=0),
                 lambda: jobs.images(actor=bob, job_id=mine.id),
                 lambda: jobs.cancel(actor=bob, job_id=mine.id),
                 lambda: jobs.delete(actor=bob, job_id=mine.id),
                 lambda: jobs.wait(actor=bob, job_id=mine.id, timeout=0)):
        with pytest.raises(NotFound):  # not 403: ids reveal nothing
            call()
    assert jobs.list_jobs(actor=bob) == ([], 0)
    assert jobs.list_jobs(actor=bob, all_users=True) == ([], 0), "only admins may list everyone's"
    assert jobs.current_progress(actor=bob) is None and jobs.interrupt(actor=bob) is None
    admin_view, total = jobs.list_jobs(actor=fake_studio.admin, all_users=True)
    assert [j.id for j in admin_view] == [mine.id] and total == 1
    assert jobs.image(actor=fake_studio.admin, job_id=mine.id, index=0)  # admins see all
    assert jobs.list_jobs(actor=fake_studio.admin) == ([], 0), "without all_users an admin lists their own"


def test_list_filters_and_paging(fake_studio):
    jobs, admin = fake_studio.jobs, fake_studio.admin
    ids = []
    for i in range(4):
        job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(seed=i))
        jobs.wait(actor=admin, job_id=job.id, timeout=30)
        ids.append(job.id)
    failed = jobs.submit(actor=admin, mode="txt2img", request=txt2img(prompt="OOM-PLEASE"))
    jobs.wait(actor=admin, job_id=failed.id, timeout=30)
    newest_first, total = jobs.list_jobs(actor=admin, limit=2)
    assert total == 5 and [j.id for j in newest_first] == [failed.id, ids[3]]
    page2, _ = jobs.list_jobs(actor=admin, limit=2, offset=2)
    assert [j.id for j in page2] == [ids[2], ids[1]]
    assert [j.id for j in jobs.list_jobs(actor=admin, status="failed")[0]] == [failed.id]
    assert jobs.list_jobs(actor=admin, mode="img2img") == ([], 0)
    assert jobs.list_jobs(actor=admin, mode=["img2img", "txt2img"], limit=None)[1] == 5
    assert jobs.list_jobs(actor=admin, checkpoint="tiny-sd15", endpoint="local")[1] == 5
    assert jobs.list_jobs(actor=admin, checkpoint="other")[1] == 0
    first = jobs.get(actor=admin, job_id=ids[0])
    assert jobs.list_jobs(actor=admin, until=first.created_at)[1] == 1
    assert jobs.list_jobs(actor=admin, since=first.created_at, limit=None)[1] == 5
    with pytest.raises(InvalidInput) as caught:
        jobs.list_jobs(actor=admin, status="exploded")
    assert caught.value.field == "status"


def test_out_of_memory_fails_that_job_clearly_and_the_next_one_runs(fake_studio):
    jobs, admin = fake_studio.jobs, fake_studio.admin
    bad = jobs.submit(actor=admin, mode="txt2img", request=txt2img(prompt="OOM-PLEASE"))
    good = jobs.submit(actor=admin, mode="txt2img", request=txt2img())
    bad_done = jobs.wait(actor=admin, job_id=bad.id, timeout=30)
    assert bad_done.status == JobStatus.FAILED and bad_done.error_kind == "oom"
    assert "out of GPU memory" in bad_done.error and "lower the batch size" in bad_done.error
    assert jobs.wait(actor=admin, job_id=good.id, timeout=30).status == JobStatus.SUCCEEDED


def test_an_internal_failure_is_recorded_and_the_queue_goes_on(fake_studio):
    jobs, admin = fake_studio.jobs, fake_studio.admin
    bad = jobs.submit(actor=admin, mode="txt2img", request=txt2img(prompt="CRASH-PLEASE"))
    good = jobs.submit(actor=admin, mode="txt2img", request=txt2img())
    assert jobs.wait(actor=admin, job_id=bad.id, timeout=30).error_kind == "internal"
    assert jobs.wait(actor=admin, job_id=good.id, timeout=30).status == JobStatus.SUCCEEDED


def test_endpoint_out_of_service_and_per_user_cap(make_settings, tiny_model_files):
    with build_model_studio(make_settings, tiny_model_files, backend="fake", max_queued_jobs_per_user=3) as studio:
        jobs, admin = studio.jobs, studio.admin
        jobs.endpoints.set_status("local", "Stopped")
        with pytest.raises(Conflict, match="Stopped"):
            jobs.submit(actor=admin, mode="txt2img", request=txt2img())
        with pytest.raises(NotFound, match="available: local"):
            jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="mars")
        jobs.endpoints.set_status("local", "InService")
        jobs._dispatchers["local"].stop()  # nothing runs: jobs stay queued
        for _ in range(3):
            jobs.submit(actor=admin, mode="txt2img", request=txt2img())
        with pytest.raises(Throttled, match="3 queued jobs"):
            jobs.submit(actor=admin, mode="txt2img", request=txt2img())
        assert jobs.list_jobs(actor=admin)[1] == 3


class TestSlowJobs:
    def test_cancel_running_stops_within_a_step_and_the_next_job_runs(self, fake_studio):
        jobs, admin = fake_studio.jobs, fake_studio.admin
        long = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150, n_iter=10))
        after = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=2))
        _wait_running(jobs, admin, long.id)
        snapshot = jobs.current_progress(actor=admin)
        assert snapshot.job_id == long.id and snapshot.status == JobStatus.RUNNING and snapshot.total == 150
        jobs.cancel(actor=admin, job_id=long.id)
        done = jobs.wait(actor=admin, job_id=long.id, timeout=10)
        assert done.status == JobStatus.CANCELLED and done.image_keys == []
        assert jobs.wait(actor=admin, job_id=after.id, timeout=10).status == JobStatus.SUCCEEDED

    def test_cancel_queued_and_interrupt(self, fake_studio):
        jobs, admin = fake_studio.jobs, fake_studio.admin
        running = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150))
        waiting = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150))
        _wait_running(jobs, admin, running.id)
        assert jobs.progress(actor=admin, job_id=waiting.id).queue_position == 0
        assert jobs.cancel(actor=admin, job_id=waiting.id).status == JobStatus.CANCELLED
        assert jobs.interrupt(actor=admin).id == running.id
        assert jobs.wait(actor=admin, job_id=running.id, timeout=10).status == JobStatus.CANCELLED
        assert jobs.current_progress(actor=admin) is None

    def test_admin_may_cancel_another_users_job(self, fake_studio):
        jobs = fake_studio.jobs
        alice = add_user(fake_studio, "alice")
        job = jobs.submit(actor=alice, mode="txt2img", request=txt2img(steps=150))
        _wait_running(jobs, alice, job.id)
        jobs.cancel(actor=fake_studio.admin, job_id=job.id)
        assert jobs.wait(actor=alice, job_id=job.id, timeout=10).status == JobStatus.CANCELLED

    def test_wait_times_out_and_progress_moves(self, fake_studio):
        jobs, admin = fake_studio.jobs, fake_studio.admin
        job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150, task_id="ignored"),
                          task_id="my-task")
        assert jobs.find_by_task(actor=admin, task_id="my-task").id == job.id
        assert jobs.wait(actor=admin, job_id=job.id, timeout=0.2).status in (JobStatus.QUEUED, JobStatus.RUNNING)
        _wait_running(jobs, admin, job.id)
        first = jobs.progress(actor=admin, job_id=job.id).step
        time.sleep(0.2)
        later = jobs.progress(actor=admin, job_id=job.id)
        assert later.step > first and later.eta is not None and later.preview_png.startswith(b"\x89PNG")
        jobs.cancel(actor=admin, job_id=job.id)

    def test_deleting_a_model_is_refused_while_a_job_uses_it(self, fake_studio):
        jobs, admin, models = fake_studio.jobs, fake_studio.admin, fake_studio.models
        job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150, prompt="<lora:tinylora:1>"))
        with pytest.raises(Conflict, match=job.id):
            fake_studio.studio.models.delete(actor=admin, model_id=models.lora.id)
        jobs.cancel(actor=admin, job_id=job.id)
        jobs.wait(actor=admin, job_id=job.id, timeout=10)
        fake_studio.studio.models.delete(actor=admin, model_id=models.lora.id)

    def test_delete_removes_the_row_and_its_images(self, fake_studio):
        jobs, admin, store = fake_studio.jobs, fake_studio.admin, fake_studio.store
        job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=2))
        done = jobs.wait(actor=admin, job_id=job.id, timeout=10)
        assert store.exists(done.image_keys[0])
        running = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150))
        _wait_running(jobs, admin, running.id)
        jobs.delete(actor=admin, job_id=job.id)
        jobs.delete(actor=admin, job_id=running.id)  # a running job is stopped first
        assert not store.exists(done.image_keys[0])
        assert jobs.list_jobs(actor=admin) == ([], 0)
        with pytest.raises(NotFound):
            jobs.get(actor=admin, job_id=job.id)
        time.sleep(0.3)
        assert list(store.list(f"jobs/{running.id}/")) == []


def test_deleting_a_user_removes_their_jobs_and_the_sweep_their_images(fake_studio):
    jobs, store = fake_studio.jobs, fake_studio.store
    leaving = add_user(fake_studio, "leaving")
    staying = jobs.submit(actor=fake_studio.admin, mode="txt2img", request=txt2img())
    job = jobs.submit(actor=leaving, mode="txt2img", request=txt2img())
    done = jobs.wait(actor=leaving, job_id=job.id, timeout=30)
    jobs.wait(actor=fake_studio.admin, job_id=staying.id, timeout=30)
    fake_studio.users.delete_user(actor=fake_studio.admin, username="leaving")
    assert jobs.list_jobs(actor=fake_studio.admin, all_users=True)[1] == 1
    assert store.exists(done.image_keys[0])
    assert jobs.purge_orphan_images() == 1
    assert not store.exists(done.image_keys[0])
    assert jobs.images(actor=fake_studio.admin, job_id=staying.id), "live jobs keep their images"
