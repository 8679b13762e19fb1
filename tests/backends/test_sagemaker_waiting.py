"""An async SageMaker endpoint at zero instances takes jobs (they make it scale out) and says so while they wait:
the job's progress carries "scaling from zero" with the wait so far, which the UI's bar and A1111's /progress
show instead of a silent "Starting…"."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from deploy.backends.messages import Started
from deploy.backends.sagemaker import SageMakerBackend
from deploy.sagemaker.control import CloudEndpoint, EndpointPlan
from deploy.sagemaker.runtime import AsyncHandle
from deploy.storage import MemoryStore
from tests.backends.events import Sink
from tests.container.worker import fake_spec
from webapp.records import JobStatus
from webapp.services.jobs.service import ProgressSnapshot
from webapp.ui.job_views import progress_html

PLAN = EndpointPlan(name="scale-zero", endpoint_type="async", image_uri="img:1",
                    role_arn="arn:aws:iam::123456789012:role/r", output_path="s3://bucket/out/",
                    failure_path="s3://bucket/fail/")


class BucketStore(MemoryStore):
    """The backend expects the studio's S3 store (bucket and prefix name its channels); memory is enough here."""

    bucket = "bucket"
    prefix = "studio/"


class ZeroInstances:
    """The control plane of an InService async endpoint that has scaled in to zero."""

    def describe(self, name: str) -> CloudEndpoint:
        return CloudEndpoint(name=name, status="InService", failure_reason=None, endpoint_type="async",
                             current_instances=0, desired_instances=0, config_name=name, managed=True,
                             created_at=datetime.now(UTC), last_modified=None)

    def apply_scaling(self, plan: EndpointPlan) -> None:
        return None


class Queued:
    """A runtime whose invocations stay queued (no instance picks them up)."""

    def submit_async(self, endpoint: str, spec) -> AsyncHandle:
        return AsyncHandle(inference_id=f"{spec.job_id}-1", input_key="sagemaker/inputs/x.json",
                           output_location="s3://bucket/out/x.out", failure_location="s3://bucket/fail/x-error.out",
                           progress_key="sagemaker/progress/x.json", submitted_at=time.time() - 75, job_id=spec.job_id)

    def poll(self, handle: AsyncHandle) -> None:
        return None


def test_a_job_on_an_endpoint_at_zero_instances_says_it_waits_for_the_scale_out():
    backend = SageMakerBackend("scale-zero", plan=PLAN, store=BucketStore(), control=ZeroInstances(),
                               runtime=Queued(), state_seconds=0.05, poll_seconds=0.05, waiting_note_seconds=0.1,
                               region="us-east-1")
    sink = Sink()
    backend.start(sink)
    try:
        deadline = time.monotonic() + 10
        while backend.free_slots() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert backend.health() == (True, None)  # at zero instances an async endpoint still takes jobs
        backend.submit(fake_spec("waits"))
        assert sink.of(Started, "waits")[0].handle["inference_id"] == "waits-1"
        waiting = sink.wait_progress("waits")
        assert waiting.phase == "waiting" and waiting.total == 0
        assert "scaling from zero" in waiting.log[-1] and "waited 1m 1" in waiting.log[-1]
    finally:
        backend.stop()
    snapshot = ProgressSnapshot(job_id="waits", status=JobStatus.RUNNING, mode="txt2img", task_id=None, step=0,
                                total=0, job_no=0, job_count=1, progress=0.0, eta=None, preview_png=None,
                                queue_position=0, started_at=None, created_at=datetime.now(UTC), note=waiting.log[-1])
    assert "scaling from zero" in progress_html(snapshot)
