"""The ``sagemaker`` backend: jobs run on an AWS SageMaker endpoint serving our container, real-time or async.

One backend instance is one studio endpoint, which is one SageMaker endpoint (model → endpoint config → endpoint,
``deploy/sagemaker/control.py``). Its watcher thread keeps what the studio shows in step with the cloud — the
drift ESD users complained about:

* provisioning (only when an administrator deploys, never on a restart): the endpoint is created, and once
  InService its autoscaling is applied (async: 0..max with scale-from-zero; real-time: 1..max);
* every ``state_seconds`` it describes the endpoint: Creating → InService (or Failed with SageMaker's
  FailureReason), still Creating after ``create_timeout_minutes`` → Failed saying so, deleted behind the studio's
  back → Failed ("gone"); the instance counts go into the capabilities the Endpoints tab shows;
* ``status()`` tells the fleet which of those the endpoint row shows; ``health()`` holds the queue while it is
  not InService.

Jobs (``deploy/sagemaker/runtime.py``): real-time ones are one ``invoke_endpoint`` each on a thread; async ones
are queued with ``invoke_endpoint_async`` inside ``submit`` — the ``Started`` event carries the invocation's handle
(InferenceId, output and failure locations), which the control plane records before ``submit`` returns — and the
watcher collects every held handle each ``poll_seconds`` (progress objects, then the answer or the failure file).
A restarted studio ``adopt``s them: nothing is lost and nothing runs twice. While an async endpoint has no
instance, a job's progress says it is scaling from zero and for how long it has waited.

``train_lora`` jobs run as SageMaker training jobs on instances of their own, with the endpoint's image and role
(``deploy/backends/sagemaker_training.py``: ``CloudTrainings``, which the watcher polls); they share the
endpoint's ``slots``.

SageMaker cannot cancel an invocation: a cancel ends the job here at once and its answer is dropped when it
comes. The container reaches models and writes images through the studio's S3 asset store, so this backend
needs one (``s3://bucket/prefix``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy.backends.base import (
    STOPPED_MESSAGE,
    Backend,
    BackendBusy,
    BackendError,
    BackendNotConfigured,
    Capabilities,
    EventSink,
    deliver,
    engine_lists,
)
from deploy.backends.messages import TERMINAL_EVENTS, Cancelled, Event, Failed, JobSpec, Progress, Started
from deploy.backends.registry import BackendConfig
from deploy.jobkinds import GENERATE, TRAIN_LORA
from deploy.storage import BlobStore

log = logging.getLogger(__name__)

SERVING = ("InService", "Updating", "SystemUpdating")
"""SageMaker statuses in which an endpoint answers invocations."""
GONE = "Gone"
"""Our status for an endpoint SageMaker no longer knows (deleted outside the studio)."""


@dataclass(frozen=True)
class CloudState:
    """What the watcher last saw: SageMaker's status (or ``Gone``), why it is not serving, instance counts."""

    status: str
    reason: str | None = None
    current_instances: int | None = None
    desired_instances: int | None = None
    since: float = 0.0
    """``time.monotonic()`` when the status was first seen."""


def _elapsed(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class _Held:
    spec: JobSpec
    handle: Any = None  # AsyncHandle for async jobs
    cancelled: bool = False
    last_progress: float = 0.0


class SageMakerBackend(Backend):
    kind = "sagemaker"
    adopts = True
    owns_cloud_resources = True

    def __init__(self, name: str, *, plan: Any, store: BlobStore, slots: int = 4, provision: bool = False,
                 manage: bool = True, create_timeout_minutes: float = 30.0, state_seconds: float = 15.0,
                 poll_seconds: float = 2.0, region: str | None = None, control: Any = None,
                 runtime: Any = None, waiting_note_seconds: float = 5.0,
                 training_instance_type: str = "ml.g5.2xlarge", training: Any = None) -> None:
        """``plan``: the ``EndpointPlan`` (validated). ``provision``: create the endpoint if it does not exist (an
        administrator deploying); a restart never creates one. ``manage``: False for an endpoint created outside the
        studio — used, never scaled or deleted here."""
        super().__init__(name)
        from deploy.sagemaker.control import SageMakerControl
        from deploy.sagemaker.runtime import SageMakerRuntime

        self.plan = plan
        self.slots = slots
        self.provision = provision
        self.manage = manage
        self.create_timeout = float(create_timeout_minutes) * 60.0
        self.state_seconds = float(state_seconds)
        self.poll_seconds = float(poll_seconds)
        self.waiting_note_seconds = float(waiting_note_seconds)
        """Without progress this long on an endpoint at zero instances, a job says it waits for a scale-out."""
        self.asynchronous = plan.endpoint_type == "async"
        self.control = control or SageMakerControl(region=region)
        self.runtime = runtime or SageMakerRuntime(store=store)
        self.trainings = self._trainings(store, region, training_instance_type, training)
        self._sink: EventSink | None = None
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._state: CloudState | None = None
        self._scaled = False
        self._create_failed = False
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def _trainings(self, store: BlobStore, region: str | None, instance_type: str, training: Any) -> Any:
        import boto3

        from deploy.backends.sagemaker_training import CloudTrainings
        from deploy.sagemaker.training import SageMakerTraining

        if training is None:
            training = SageMakerTraining(store=store, session=boto3.session.Session(region_name=region)
                                         if region else None)
        return CloudTrainings(endpoint=self.name, image_uri=self.plan.image_uri, role_arn=self.plan.role_arn,
                              instance_type=instance_type, store=store, emit=self._emit,
                              interval=self.poll_seconds, training=training)

    # -- contract ---------------------------------------------------------------------------------------------
    def is_configured(self) -> bool:
        return True  # the plan was validated when built; the cloud's answer is the watcher's business

    def capabilities(self) -> Capabilities:
        state = self._state
        extra: dict[str, Any] = {"endpoint_type": self.plan.endpoint_type, "instance_type": self.plan.instance_type,
                                 "managed": self.manage}
        if state is not None:
            extra.update(cloud_status=state.status, current_instances=state.current_instances,
                         desired_instances=state.desired_instances)
        return Capabilities(slots=self.slots, remote=True, previews=self.asynchronous, devices=(self.name,),
                            kinds=(GENERATE, TRAIN_LORA), extra=extra, **engine_lists())

    def start(self, sink: EventSink) -> None:
        if self._sink is not None:
            raise BackendError(f"backend {self.name!r} is already started")
        self._sink = sink
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, name=f"sagemaker-{self.name}", daemon=True)
        self._watcher.start()

    def status(self) -> tuple[str, str | None] | None:
        """What the endpoint row shows: ``Creating``, ``InService`` or ``Failed`` with the reason."""
        state = self._state
        if state is None:
            return ("Creating", "waiting for SageMaker's first answer")
        if state.status in SERVING:
            return ("InService", None)
        if state.status == "Creating":
            return ("Creating", state.reason)
        return ("Failed", state.reason or f"SageMaker says the endpoint is {state.status}")

    def health(self) -> tuple[bool, str | None]:
        state = self._state
        if state is None:
            return False, "waiting for SageMaker's first answer"
        if state.status in SERVING:
            if not self.asynchronous and state.current_instances == 0:
                return False, "the real-time endpoint has no instance"
            return True, None  # an async endpoint at zero instances takes jobs: they make it scale out
        status = self.status()
        return False, (status[1] if status else None) or state.status

    def free_slots(self) -> int:
        if self._sink is None or self._stopping.is_set():
            return 0
        state = self._state
        if state is None or state.status not in SERVING:
            return 0
        with self._lock:
            return max(0, self.slots - len(self._held) - self.trainings.count())

    def submit(self, spec: JobSpec) -> None:
        if self._sink is None or self._stopping.is_set():
            raise BackendError(f"backend {self.name!r} is not running")
        with self._lock:
            if len(self._held) + self.trainings.count() >= self.slots:
                raise BackendBusy(f"endpoint {self.name!r} has {self.slots} job(s) in flight already")
            if spec.job_id in self._held or self.trainings.holds(spec.job_id):
                raise BackendError(f"job {spec.job_id} is already held by {self.name!r}")
            if spec.kind != TRAIN_LORA:
                held = self._held[spec.job_id] = _Held(spec=spec)
        if spec.kind == TRAIN_LORA:
            self._train(spec)
            return
        if not self.asynchronous:
            self._emit(Started(job_id=spec.job_id, worker=self.name))
            threading.Thread(target=self._invoke, args=(held,), name=f"sagemaker-{self.name}-{spec.job_id[:8]}",
                             daemon=True).start()
            return
        from deploy.sagemaker.runtime import InvocationError

        try:
            handle = self.runtime.submit_async(self.plan.name, spec)
        except (InvocationError, ValueError) as exc:
            with self._lock:
                self._held.pop(spec.job_id, None)
            raise BackendError(f"endpoint {self.name!r} refused job {spec.job_id}: {exc}") from exc
        held.handle = handle
        held.last_progress = time.monotonic()
        self._emit(Started(job_id=spec.job_id, worker=self.name, handle=handle.to_dict()))

    def adopt(self, spec: JobSpec, handle: Mapping[str, Any]) -> bool:
        from deploy.backends.sagemaker_training import HANDLE_KEY

        if HANDLE_KEY in handle:
            return spec.kind == TRAIN_LORA and self.trainings.adopt(spec, handle)
        if not self.asynchronous:
            return False
        from deploy.sagemaker.runtime import AsyncHandle

        try:
            parsed = AsyncHandle.from_dict(handle)
        except ValueError:
            return False
        with self._lock:
            self._held[spec.job_id] = _Held(spec=spec, handle=parsed, last_progress=time.monotonic())
        log.info("endpoint %s: collecting job %s (inference %s) again", self.name, spec.job_id, parsed.inference_id)
        return True

    def cancel(self, job_id: str) -> bool:
        """SageMaker cannot stop an invocation: the job ends here now; its answer is dropped when it comes. A
        training job is asked to stop, and ends when SageMaker says it has."""
        if self.trainings.cancel(job_id):
            return True
        with self._lock:
            held = self._held.pop(job_id, None)
        if held is None:
            return False
        if held.handle is not None:
            self._cleanup_later(held.handle)
        self._emit(Cancelled(job_id=job_id, reason="cancelled (SageMaker finishes the invocation; its answer is "
                                                   "dropped)"))
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Async jobs and trainings go on in the cloud (the next start adopts them); real-time ones report
        interrupted."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        self.trainings.stop()
        with self._lock:
            realtime = [job_id for job_id, held in self._held.items() if held.handle is None]
            self._held.clear()
        for job_id in realtime:
            self._emit(Failed(job_id=job_id, message=STOPPED_MESSAGE, kind="interrupted"))

    def teardown(self) -> None:
        """Delete the endpoint, its config, model and scaling (an administrator deleted the studio endpoint);
        an endpoint created outside the studio is left alone."""
        if self.manage:
            self.control.delete(self.plan.name)

    def describe(self) -> str:
        state = self._state
        counts = f", {state.current_instances} instance(s)" if state and state.current_instances is not None else ""
        return f"sagemaker {self.plan.endpoint_type} {self.plan.instance_type}{counts}"

    # -- jobs ---------------------------------------------------------------------------------------------------
    def _train(self, spec: JobSpec) -> None:
        from deploy.backends.sagemaker_training import TrainingRefused

        try:
            self.trainings.submit(spec)
        except TrainingRefused as exc:
            raise BackendError(f"endpoint {self.name!r}: {exc}") from exc

    def _invoke(self, held: _Held) -> None:
        from deploy.sagemaker.runtime import InvocationError

        spec = held.spec
        try:
            event: Event = self.runtime.invoke(self.plan.name, spec)
        except InvocationError as exc:
            kind = "bad_request" if exc.kind == "validation" else (
                "interrupted" if exc.kind in ("throttled", "unavailable", "timeout") else "internal")
            event = Failed(job_id=spec.job_id, message=f"endpoint {self.name}: {exc.message}", kind=kind)
        except Exception as exc:  # noqa: BLE001 - reported as the job's failure
            log.exception("endpoint %s: invoking job %s failed", self.name, spec.job_id)
            event = Failed(job_id=spec.job_id, message=f"internal error: {type(exc).__name__}: {exc}")
        with self._lock:
            mine = self._held.pop(spec.job_id, None) is held
        if mine:
            self._emit(event)

    def _collect(self) -> None:
        """One look at every held async job."""
        from deploy.sagemaker.runtime import InvocationError

        with self._lock:
            jobs = [(job_id, held) for job_id, held in self._held.items() if held.handle is not None]
        for job_id, held in jobs:
            try:
                event = self.runtime.poll(held.handle)
            except InvocationError as exc:
                log.warning("endpoint %s: collecting job %s: %s (trying again)", self.name, job_id, exc)
                continue
            if event is None:
                self._waiting(held)
                continue
            if isinstance(event, TERMINAL_EVENTS):
                with self._lock:
                    mine = self._held.pop(job_id, None) is held
                if mine:
                    self._emit(event)
                    self._cleanup_later(held.handle)
            elif isinstance(event, Progress):
                held.last_progress = time.monotonic()
                self._emit(event)

    def _waiting(self, held: _Held) -> None:
        """No progress yet: say why when the endpoint has no instance (scaling from zero takes minutes)."""
        state = self._state
        if state is None or state.current_instances != 0 or \
                time.monotonic() - held.last_progress < self.waiting_note_seconds:
            return
        held.last_progress = time.monotonic()
        waited = time.time() - held.handle.submitted_at
        self._emit(Progress(job_id=held.spec.job_id, step=0, total=0, phase="waiting",
                            log=(f"endpoint {self.name} is scaling from zero: waited {_elapsed(waited)} so far "
                                 "(a cold start takes minutes)",)))

    def _cleanup_later(self, handle: Any) -> None:
        threading.Thread(target=self._cleanup, args=(handle,), daemon=True).start()

    def _cleanup(self, handle: Any) -> None:
        try:
            self.runtime.cleanup(handle)
        except Exception as exc:  # noqa: BLE001 - leftovers are small; the bucket's lifecycle may expire them
            log.warning("endpoint %s: removing the objects of inference %s failed: %s", self.name,
                        handle.inference_id, exc)

    # -- the cloud -------------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        if self.provision and self.manage:
            self._provision()
        next_state = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_state:
                next_state = now + self.state_seconds
                try:
                    self._observe()
                except Exception:  # noqa: BLE001 - the watcher must survive; the next look may succeed
                    log.exception("endpoint %s: reading its state from SageMaker failed", self.name)
            if self.asynchronous:
                try:
                    self._collect()
                except Exception:  # noqa: BLE001
                    log.exception("endpoint %s: collecting results failed", self.name)
            try:
                self.trainings.poll()
            except Exception:  # noqa: BLE001
                log.exception("endpoint %s: following its training jobs failed", self.name)
            self._stopping.wait(min(self.poll_seconds, self.state_seconds))

    def _provision(self) -> None:
        from deploy.sagemaker.control import CloudError

        try:
            if self.control.describe(self.plan.name) is None:
                self.control.create(self.plan)
                log.info("endpoint %s: SageMaker endpoint %s created (%s, %s)", self.name, self.plan.name,
                         self.plan.endpoint_type, self.plan.instance_type)
        except CloudError as exc:
            self._create_failed = True
            self._set_state(CloudState(status="Failed", reason=f"creating it on SageMaker failed: {exc}"))

    def _observe(self) -> None:
        from deploy.sagemaker.control import CloudError

        if self._create_failed:
            return  # nothing was created: nothing to watch
        try:
            cloud = self.control.describe(self.plan.name)
        except CloudError as exc:
            previous = self._state
            self._set_state(CloudState(status=previous.status if previous else "Creating",
                                       reason=f"SageMaker could not be asked: {exc}",
                                       current_instances=previous.current_instances if previous else None,
                                       desired_instances=previous.desired_instances if previous else None))
            return
        if cloud is None:
            self._set_state(CloudState(status=GONE, reason=f"the SageMaker endpoint {self.plan.name} no longer "
                                                           "exists (deleted outside the studio)"))
            return
        reason = cloud.failure_reason
        status = cloud.status
        if status == "Creating":
            created = cloud.created_at.timestamp() if cloud.created_at else None
            waited = time.time() - created if created else 0.0
            if waited > self.create_timeout:
                status = "Failed"
                reason = (f"still Creating after {_elapsed(waited)} (the limit is {_elapsed(self.create_timeout)})"
                          + (f": {cloud.failure_reason}" if cloud.failure_reason else ""))
            else:
                reason = f"Creating on SageMaker for {_elapsed(waited)}"
        self._set_state(CloudState(status=status, reason=reason, current_instances=cloud.current_instances,
                                   desired_instances=cloud.desired_instances))
        if status == "InService" and self.manage and not self._scaled:
            try:
                self.control.apply_scaling(self.plan)
                self._scaled = True
            except CloudError as exc:
                log.warning("endpoint %s: applying autoscaling failed (trying again): %s", self.name, exc)

    def _set_state(self, state: CloudState) -> None:
        previous = self._state
        since = previous.since if previous is not None and previous.status == state.status else time.monotonic()
        self._state = CloudState(status=state.status, reason=state.reason, current_instances=state.current_instances,
                                 desired_instances=state.desired_instances, since=since)
        if previous is None or previous.status != state.status:
            log.info("endpoint %s: SageMaker status %s%s", self.name, state.status,
                     f" ({state.reason})" if state.reason else "")

    def _emit(self, event: Event) -> None:
        deliver(self._sink, event, self.name)


def build_plan(config: BackendConfig, options: Any) -> Any:
    """The ``EndpointPlan`` of a studio endpoint: its options, its instance bounds and the studio's S3 store (where
    the container finds models and writes images, and SageMaker writes async answers)."""
    from deploy.sagemaker.control import EndpointPlan, ScalingPlan
    from deploy.storage.s3 import S3Store

    store = config.store
    if not isinstance(store, S3Store):
        raise BackendNotConfigured("SageMaker endpoints need the studio's asset store on S3 (--store s3://bucket/"
                                   "prefix): the container reads models from it and writes images to it")
    if not options.image_uri:
        raise BackendNotConfigured("no container image: set `image_uri` or the server's STUDIO_SAGEMAKER_IMAGE_URI")
    if not options.role_arn:
        raise BackendNotConfigured("no execution role: set `role_arn` or the server's STUDIO_SAGEMAKER_ROLE_ARN")
    root = f"s3://{store.bucket}/{store.prefix}".rstrip("/")
    name = options.sagemaker_name or config.name
    low = config.min_instances
    scaling = ScalingPlan(enabled=config.autoscale, min_instances=low, max_instances=max(low, config.max_instances),
                          target_value=options.target_value, scale_in_cooldown=options.scale_in_cooldown,
                          scale_out_cooldown=options.scale_out_cooldown)
    environment = {"STUDIO_WORKER_STORE": root, **options.environment}
    return EndpointPlan(
        name=name, endpoint_type=options.endpoint_type, image_uri=options.image_uri, role_arn=options.role_arn,
        instance_type=options.instance_type, initial_instances=max(1, min(options.initial_instance_count,
                                                                          scaling.max_instances)),
        environment=environment, output_path=f"{root}/sagemaker/async-output/{name}/",
        failure_path=f"{root}/sagemaker/async-failure/{name}/", success_topic=options.success_topic,
        error_topic=options.error_topic, scaling=scaling)


def create(config: BackendConfig) -> SageMakerBackend:
    from deploy.backends.options import parse_options
    from deploy.sagemaker.control import PlanError

    options = parse_options("sagemaker", config.options)
    try:
        plan = build_plan(config, options)
    except PlanError as exc:
        raise ValueError(str(exc)) from None
    assert config.store is not None  # build_plan checked
    return SageMakerBackend(config.name, plan=plan, store=config.store, slots=options.slots,
                            provision=config.provision, manage=not options.existing,
                            create_timeout_minutes=options.create_timeout_minutes,
                            state_seconds=options.state_seconds, poll_seconds=options.poll_seconds,
                            region=options.region, training_instance_type=options.training_instance_type)
