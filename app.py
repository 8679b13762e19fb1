"""The studio's composition root: read Settings, build services and backends once, mount UI + APIs, serve.

    python app.py [--listen] [--port N] [--data-dir DIR] [--store s3://bucket/prefix]

Nothing heavy (torch, diffusers) is imported on this path: the engine loads lazily when a job needs it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the product runs air-gapped: never reach for the hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from deploy.model_files import ModelFiles  # noqa: E402
from deploy.storage import BlobStore, open_store  # noqa: E402
from pipelines.controlnet.preprocessors import Annotators  # noqa: E402
from webapp import schema  # noqa: E402
from webapp.api import sdapi  # noqa: E402
from webapp.api.sdapi import controlnet as controlnet_api  # noqa: E402
from webapp.api.v1 import account as account_api  # noqa: E402
from webapp.api.v1 import audit as audit_api  # noqa: E402
from webapp.api.v1 import checkpoints as checkpoints_api  # noqa: E402
from webapp.api.v1 import datasets as datasets_api  # noqa: E402
from webapp.api.v1 import endpoints as endpoints_api  # noqa: E402
from webapp.api.v1 import inferences as inferences_api  # noqa: E402
from webapp.api.v1 import jobs as jobs_api  # noqa: E402
from webapp.api.v1 import models as models_api  # noqa: E402
from webapp.api.v1 import roles as roles_api  # noqa: E402
from webapp.api.v1 import tasks as tasks_api  # noqa: E402
from webapp.api.v1 import trainings as trainings_api  # noqa: E402
from webapp.api.v1 import uploads as uploads_api  # noqa: E402
from webapp.api.v1 import users as users_api  # noqa: E402
from webapp.db import Database  # noqa: E402
from webapp.services.audit import AuditLog  # noqa: E402
from webapp.services.auth import AuthService  # noqa: E402
from webapp.services.controlnet import ControlNetService  # noqa: E402
from webapp.services.datasets import DatasetService, Limits  # noqa: E402
from webapp.services.errors import InvalidInput  # noqa: E402
from webapp.services.idle import ActivityClock, IdleWatcher  # noqa: E402
from webapp.services.jobs import EndpointAdmin, Fleet, JobService, build_jobs  # noqa: E402
from webapp.services.jobs.cloud_inventory import SageMakerInventory  # noqa: E402
from webapp.services.jobs.leases import Instance  # noqa: E402
from webapp.services.jobs.quotas import JobQuotas  # noqa: E402
from webapp.services.metrics import JobMetrics  # noqa: E402
from webapp.services.models import ModelRegistry  # noqa: E402
from webapp.services.models.wiring import ModelServices, build_model_services  # noqa: E402
from webapp.services.options import OptionsService  # noqa: E402
from webapp.services.passwords import Passwords  # noqa: E402
from webapp.services.quota import DiskQuota  # noqa: E402
from webapp.services.roles import RoleService  # noqa: E402
from webapp.services.throttle import LoginThrottle  # noqa: E402
from webapp.services.tokens import TokenService  # noqa: E402
from webapp.services.trainings import TrainingRegistrar, TrainingService  # noqa: E402
from webapp.services.users import ADMIN_USERNAME, UserService  # noqa: E402
from webapp.settings import Settings, settings_from_args  # noqa: E402
from webapp.ui.account_tab import AccountTab  # noqa: E402
from webapp.ui.context import UiContext  # noqa: E402
from webapp.ui.controlnet_ui import ControlNetPanel  # noqa: E402
from webapp.ui.datasets_tab import DatasetsTab  # noqa: E402
from webapp.ui.endpoints_tab import EndpointsTab  # noqa: E402
from webapp.ui.generate_tab import GenerateTab  # noqa: E402
from webapp.ui.models_tab import ModelsTab  # noqa: E402
from webapp.ui.pnginfo_tab import PngInfoTab  # noqa: E402
from webapp.ui.shell import build_ui  # noqa: E402
from webapp.ui.training_tab import TrainingTab  # noqa: E402
from webapp.ui.users_tab import UsersTab  # noqa: E402
from webapp.web.files import build_files_router  # noqa: E402
from webapp.web.lazy_ui import LazyUi  # noqa: E402
from webapp.web.metrics import MetricsAccess  # noqa: E402
from webapp.web.server import UiUploads, create_app, use_gradio_temp_dir  # noqa: E402

log = logging.getLogger("studio")


class StartupRefused(RuntimeError):
    pass


@dataclass
class Studio:
    """Everything app.py built, for the server and for tests."""

    settings: Settings
    db: Database
    store: BlobStore
    users: UserService
    auth: AuthService
    app: FastAPI
    generated_admin_password: str | None
    tokens: TokenService | None = None
    models: ModelRegistry | None = None
    model_services: ModelServices | None = None
    jobs: JobService | None = None
    options: OptionsService | None = None
    quota: DiskQuota | None = None
    controlnet: ControlNetService | None = None
    fleet: Fleet | None = None
    endpoint_admin: EndpointAdmin | None = None
    metrics: JobMetrics | None = None
    idle: IdleWatcher | None = None
    datasets: DatasetService | None = None
    trainings: TrainingService | None = None
    training_registrar: TrainingRegistrar | None = None
    inventory: SageMakerInventory | None = None
    roles: RoleService | None = None
    audit: AuditLog | None = None
    ui: LazyUi | None = None

    def close(self) -> None:
        if self.idle is not None:
            self.idle.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.jobs is not None:
            self.jobs.stop()
        if self.training_registrar is not None:
            self.training_registrar.close()
        if self.model_services is not None:
            self.model_services.close()
        self.db.dispose()


def build(settings: Settings) -> Studio:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    default_imports = settings.data_dir / "imports"
    if default_imports in settings.import_roots:  # where admins put files for Models › From server
        default_imports.mkdir(exist_ok=True)
    if settings.annotators_dir is not None:  # where admins put ControlNet preprocessor weights
        settings.annotators_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    schema.upgrade(db)
    is_s3 = settings.store_url.startswith("s3://")
    store_options = {"endpoint_url": settings.store_endpoint_url} if is_s3 and settings.store_endpoint_url else {}
    store = open_store(settings.store_url, **store_options)

    passwords = Passwords.with_cost(memory_kib=settings.password_hash_memory_kib,
                                    time_cost=settings.password_hash_time_cost,
                                    parallelism=settings.password_hash_parallelism)
    users = UserService(db, passwords)
    roles = RoleService(db)
    audit_log = AuditLog(db)
    admin_password = settings.admin_password.get_secret_value() if settings.admin_password else None
    if settings.listens_publicly and admin_password is None and not users.has_admin():
        raise StartupRefused(
            "refusing to listen on all interfaces with no administrator: set STUDIO_ADMIN_PASSWORD for the "
            f"first start (or start once without --listen and note the generated {ADMIN_USERNAME!r} password)"
        )
    try:
        generated = users.ensure_admin(admin_password)
    except InvalidInput as exc:
        raise StartupRefused(f"STUDIO_ADMIN_PASSWORD cannot be the first administrator's password: {exc.message}") from None

    throttle = LoginThrottle(
        db,
        max_per_user=settings.login_max_failures_per_user,
        max_per_address=settings.login_max_failures_per_address,
        max_per_account=settings.login_max_failures_per_account,
        window_seconds=settings.login_window_seconds,
    )
    tokens = TokenService(db)
    auth = AuthService(
        db, users, passwords, throttle, session_ttl=timedelta(hours=settings.session_ttl_hours), tokens=tokens,
    )
    auth.purge_expired()
    quota = DiskQuota(db, limit_bytes=int(settings.user_quota_gb * 1024**3),
                      role_limit_mb=lambda user: roles.effective_quotas(user)["max_storage_mb"])
    job_quotas = JobQuotas(db, limits=roles.effective_quotas, disk=quota)
    instance = Instance.of_data_dir(settings.data_dir)  # who this process is to the jobs and imports it owns
    model_services = build_model_services(settings, db, store, quota, instance=instance)
    datasets = DatasetService(db, store, quota, Limits(
        max_files=settings.dataset_max_files, max_total_bytes=int(settings.dataset_max_mb * 2**20),
        max_image_bytes=int(settings.ui_max_file_mb * 2**20), max_pixels=settings.max_job_pixels))
    assert settings.model_cache_dir is not None  # filled by the settings validator
    model_files = ModelFiles(store, settings.model_cache_dir, int(settings.model_cache_budget_gb * 1024**3))
    metrics = JobMetrics(db)
    activity = ActivityClock()
    registrar = TrainingRegistrar(db=db, store=store, registry=model_services.registry,  # a training's LoRAs
                                  temp_dir=settings.data_dir / "tmp" / "trainings",     # become models
                                  instance=instance)
    built_jobs = build_jobs(settings=settings, db=db, store=store, registry=model_services.registry,
                            model_files=model_files, quota=quota, observers=(metrics, activity, registrar),
                            instance=instance, quotas=job_quotas)
    jobs, fleet, endpoint_admin = built_jobs.service, built_jobs.fleet, built_jobs.admin
    inventory = built_jobs.inventory
    idle = IdleWatcher(activity=activity, jobs=jobs, unload_after_seconds=settings.idle_unload_minutes * 60,
                       shutdown_after_seconds=settings.idle_shutdown_minutes * 60,
                       shutdown_command=settings.idle_shutdown_command)
    options = OptionsService(db, model_services.registry)
    trainings = TrainingService(jobs=jobs, registry=model_services.registry, datasets=datasets, store=store)
    jobs.set_default_checkpoint(options.default_checkpoint_ref)  # per-user A1111 options pick the model
    controlnet = ControlNetService(
        model_services.registry, Annotators(settings.annotators_dir or settings.data_dir / "annotators", device="cpu"),
        max_pixels=settings.max_job_pixels, max_images=settings.controlnet_detect_max_images,
        concurrency=settings.controlnet_detect_concurrency)
    sdapi_ctx = sdapi.SdapiContext(settings=settings, options=options, registry=model_services.registry, jobs=jobs)

    gradio_temp = use_gradio_temp_dir(settings.data_dir / "tmp" / "gradio")  # before any Gradio component is built
    ui_ctx = UiContext(users=users)

    def build_page() -> gr.Blocks:  # on first use (LazyUi): API-only use never pays for the page
        os.environ["GRADIO_TEMP_DIR"] = str(gradio_temp)  # this studio's, should another have been built since

        def controlnet_panel(mode: str) -> ControlNetPanel:
            return ControlNetPanel(ui_ctx, controlnet, model_services.registry, mode=mode,
                                   unit_count=settings.controlnet_unit_count,
                                   max_image_bytes=int(settings.ui_max_file_mb * 1024**2))

        txt2img = GenerateTab(ui_ctx, jobs=jobs, registry=model_services.registry, mode="txt2img",
                              controlnet=controlnet_panel("txt2img"))
        img2img = GenerateTab(ui_ctx, jobs=jobs, registry=model_services.registry, mode="img2img",
                              senders=[txt2img], controlnet=controlnet_panel("img2img"))
        pnginfo = PngInfoTab(ui_ctx, registry=model_services.registry, target=txt2img)
        models_tab = ModelsTab(ui_ctx, model_services)
        endpoints_tab = EndpointsTab(ui_ctx, endpoints=jobs.endpoints, admin=endpoint_admin, inventory=inventory)
        datasets_tab = DatasetsTab(ui_ctx, datasets, max_file_bytes=int(settings.ui_max_file_mb * 1024**2))
        training_tab = TrainingTab(ui_ctx, trainings, datasets)
        return build_ui(ui_ctx, [txt2img, img2img, pnginfo, models_tab, datasets_tab, training_tab, endpoints_tab,
                                 UsersTab(ui_ctx, roles=roles, audit=audit_log),
                                 AccountTab(ui_ctx, tokens=tokens, auth=auth, quota=quota, job_quotas=job_quotas)])

    routers = [jobs_api.build_router(jobs), build_files_router(jobs)]
    routers += [
        *sdapi.build_routers(sdapi_ctx), account_api.build_router(tokens, quota, roles, job_quotas), users_api.build_router(users, auth),
        endpoints_api.build_router(jobs.endpoints, endpoint_admin), inferences_api.build_router(jobs),
        checkpoints_api.build_router(model_services.registry), datasets_api.build_router(datasets),
        trainings_api.build_router(trainings), roles_api.build_router(roles), audit_api.build_router(audit_log),
        controlnet_api.build_router(controlnet, settings.controlnet_unit_count),
    ]
    routers += [models_api.build_router(model_services), uploads_api.build_router(model_services.uploads),
                tasks_api.build_router(model_services.tasks)]
    ui_uploads = UiUploads(max_bytes=int(settings.ui_max_file_mb * 1024**2),
                           max_age_seconds=settings.ui_temp_max_age_hours * 3600)
    app = create_app(auth=auth, ui=build_page, secure_cookie=settings.cookie_secure, routers=routers, uploads=ui_uploads,
                     allowed_origins=settings.allowed_origins, forwarded_allow_ips=settings.forwarded_allow_ips,
                     max_body_bytes=int(settings.max_body_mb * 2**20),
                     metrics=MetricsAccess(render=metrics.render, token=settings.metrics_token))
    app.add_middleware(sdapi.ProcessTimeMiddleware)  # outermost: the gate's answers carry it too
    jobs.start()  # restart recovery first, then the dispatchers claim
    fleet.start(settings.endpoint_health_seconds)
    idle.start()
    registrar.start()  # registers the LoRAs of trainings that finished while the studio was down
    return Studio(
        settings=settings, db=db, store=store, users=users, auth=auth, app=app, generated_admin_password=generated,
        tokens=tokens, models=model_services.registry, model_services=model_services, jobs=jobs,
        options=options, quota=quota, controlnet=controlnet, fleet=fleet,
        endpoint_admin=endpoint_admin, metrics=metrics, idle=idle, datasets=datasets, trainings=trainings,
        training_registrar=registrar, inventory=inventory, roles=roles, audit=audit_log, ui=app.state.ui,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:  # bad STUDIO_* values or flags: one line per setting, no traceback
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            secret = any(word in name for word in ("password", "secret", "token", "key"))
            got = "(hidden)" if secret else repr(error.get("input"))
            sys.stderr.write(f"studio: setting {name} (flag --{name.replace('_', '-')} or env STUDIO_{name.upper()}): "
                             f"{error['msg']}; got {got}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        studio = build(settings)
    except StartupRefused as exc:
        log.error("%s", exc)
        return 2
    if studio.generated_admin_password:
        # Shown exactly once; only its argon2 hash is stored.
        sys.stderr.write(
            f"\n  First start: created user '{ADMIN_USERNAME}' with password: {studio.generated_admin_password}\n"
            "  (shown only now; change it in the Account tab)\n\n"
        )
        sys.stderr.flush()
    local = studio.jobs.backend("local") if studio.jobs is not None else None
    if "cpu" in getattr(local, "devices", ()):
        from deploy.runner import start_cpu_threads

        start_cpu_threads()  # on the main thread, before a worker thread's first job (see its docstring)
    import uvicorn

    if studio.ui is not None:
        studio.ui.ready()  # the page before the first visitor, not at their first request
    log.info("serving on http://%s:%d/ (data dir %s)", settings.host, settings.port, settings.data_dir)
    try:
        # proxy_headers off: the app applies forwarded_allow_ips itself (web/proxy.py); uvicorn's own copy
        # would trust X-Forwarded-For from 127.0.0.1 by default.
        uvicorn.run(studio.app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                    proxy_headers=False, forwarded_allow_ips=settings.forwarded_allow_ips or [])
    finally:
        studio.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
