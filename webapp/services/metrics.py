"""Prometheus metrics of the job system: how long jobs wait and run, how they end, what waits now.

Counters and histograms are fed by the job queue's observers (``jobs/observers.py``), the one place every
status change passes, so a job counts once whichever endpoint, dispatcher or service moved it. Gauges of
what is queued and running, and of each endpoint's status, are read from the database at scrape time (a
custom collector), so they are right even for jobs another process queued. Each ``JobMetrics`` has its
own ``CollectorRegistry``, never prometheus_client's global one: two studios in one process (tests) keep
their numbers apart. The series are documented in their HELP texts, which ``/metrics`` serves.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import select

from webapp.db import Database
from webapp.records import Endpoint, EndpointStatus, Job, JobStatus
from webapp.services.jobs.observers import FinishedJob, JobObserver, seconds_between

CONTENT_TYPE = CONTENT_TYPE_LATEST
QUEUE_WAIT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class JobMetrics(JobObserver):
    """The studio's metrics: a job observer feeding counters and histograms, plus the database gauges."""

    def __init__(self, db: Database | None = None) -> None:
        self.registry = CollectorRegistry()
        self.queue_wait = Histogram(
            "studio_job_queue_wait_seconds", "Seconds from a job's submission to its start (a re-run after an "
            "interruption counts from the submission)", ["endpoint"], buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry)
        self.run_time = Histogram(
            "studio_job_run_seconds", "Seconds a successful job ran, from its start to its result",
            ["endpoint", "mode"], buckets=RUN_BUCKETS, registry=self.registry)
        self.finished = Counter(
            "studio_jobs_finished", "Jobs that reached a final status (succeeded, failed, cancelled)",
            ["endpoint", "status"], registry=self.registry)
        self.failures = Counter(
            "studio_job_failures", "Job failures by kind (oom, bad_request, internal; interrupted: the worker "
            "was lost, counted at each re-queue and when the job is given up)", ["endpoint", "kind"],
            registry=self.registry)
        if db is not None:
            self.registry.register(JobStateCollector(db))

    def render(self) -> bytes:
        """The text exposition format (what ``/metrics`` serves, as ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    # -- JobObserver -------------------------------------------------------------------------------------
    def job_started(self, job: Job) -> None:
        if job.started_at is not None:
            waited = seconds_between(job.created_at, job.started_at)
            if waited is not None:
                self.queue_wait.labels(endpoint=job.endpoint).observe(waited)

    def job_interrupted(self, *, job_id: str, endpoint: str) -> None:
        self.failures.labels(endpoint=endpoint, kind="interrupted").inc()

    def job_finished(self, finished: FinishedJob) -> None:
        self.finished.labels(endpoint=finished.endpoint, status=str(finished.status)).inc()
        if finished.status == JobStatus.FAILED:
            self.failures.labels(endpoint=finished.endpoint, kind=finished.error_kind or "internal").inc()
        elif finished.status == JobStatus.SUCCEEDED and finished.ran_seconds is not None:
            self.run_time.labels(endpoint=finished.endpoint, mode=finished.mode).observe(finished.ran_seconds)


class JobStateCollector(Collector):
    """Queue depth and running jobs per endpoint, and each endpoint's status, read at scrape time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        with self.db.read() as s:
            endpoints = s.exec(select(Endpoint.name, Endpoint.status).order_by(Endpoint.name)).all()
            counts = s.exec(select(Job.endpoint, Job.status, func.count()).where(
                Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))  # type: ignore[attr-defined]
                .group_by(Job.endpoint, Job.status)).all()
        by_status: dict[tuple[str, str], int] = {(name, str(status)): n for name, status, n in counts}
        names = sorted({name for name, _ in endpoints} | {name for name, _ in by_status})
        queued = GaugeMetricFamily("studio_jobs_queued", "Jobs waiting in the queue, per endpoint",
                                   labels=["endpoint"])
        running = GaugeMetricFamily("studio_jobs_running", "Jobs running now, per endpoint", labels=["endpoint"])
        for name in names:
            queued.add_metric([name], by_status.get((name, JobStatus.QUEUED.value), 0))
            running.add_metric([name], by_status.get((name, JobStatus.RUNNING.value), 0))
        up = GaugeMetricFamily("studio_endpoint_up", "1 when the endpoint is InService (takes jobs), else 0; "
                               "the status label says which status it is in", labels=["endpoint", "status"])
        for name, status in endpoints:
            up.add_metric([name, str(status)], 1 if status == EndpointStatus.IN_SERVICE else 0)
        yield from (queued, running, up)
