"""Endpoints tab: everyone sees where jobs can run; administrators deploy and delete endpoints.

The list shows each endpoint's kind, status (Creating / InService / Degraded / Failed / Deleting), whether
jobs leave the server, its slots, instance bounds (and, for SageMaker, how many instances run now), when it last
changed and why it is not in service. Administrators also see the SageMaker endpoints of the account that no
studio endpoint manages (created outside the studio).
The Deploy form has one group of option widgets per kind, built from that kind's options model
(``webapp/ui/options_form.py``), shown for the chosen kind only. Hiding the admin part is cosmetic: the
handlers go through ``EndpointAdmin``, which refuses anyone but an administrator.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from deploy.backends.options import options_model
from webapp.i18n import translate
from webapp.records import Endpoint
from webapp.services.access import can
from webapp.services.errors import ServiceError
from webapp.services.jobs import Deployment, EndpointAdmin, EndpointService
from webapp.services.jobs.cloud_inventory import SageMakerInventory
from webapp.services.sharing import choices, names_of
from webapp.ui.context import UiContext, ui_errors
from webapp.ui.options_form import OptionField, build_widget, describe, read_value

HEADERS = ["Name", "Kind", "Status", "Remote", "Slots", "Instances", "Updated (UTC)", "Error", "Allowed roles"]
FORCE_LABEL = "Even while jobs run on it (a SageMaker endpoint's running jobs are lost and run again elsewhere)"
CONFIRM_LABEL = "Yes, delete it (running jobs go back to the queue; queued ones move to the default endpoint)"


UNMANAGED_HEADERS = ["Name", "Status", "Type", "Instances", "Tagged by a studio", "Created (UTC)"]


def _row(endpoint: Endpoint, names: dict[int, str]) -> list[Any]:
    instances = f"{endpoint.min_instances}–{endpoint.max_instances}" + (" autoscale" if endpoint.autoscale else "")
    current = endpoint.capabilities.get("extra", {}).get("current_instances")
    if current is not None:
        instances = f"{current} now · {instances}"
    return [endpoint.name + (" (default)" if endpoint.is_default else ""), endpoint.kind, str(endpoint.status),
            "yes" if endpoint.remote else "no", endpoint.capabilities.get("slots", ""), instances,
            endpoint.updated_at.strftime("%Y-%m-%d %H:%M:%S"), endpoint.error or "",
            ", ".join(names_of(endpoint.allowed_roles, names)) or "everyone"]


class EndpointsTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    permission: str | None = "endpoint:list"
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, *, endpoints: EndpointService, admin: EndpointAdmin,
                 inventory: SageMakerInventory | None = None) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        self.admin = admin
        self.inventory = inventory
        self.kinds = [k for k in admin.kinds() if options_model(k) is not None]
        self.fields: dict[str, list[OptionField]] = {k: describe(options_model(k)) for k in self.kinds}  # type: ignore[arg-type]
        self.widgets: dict[str, dict[str, gr.components.Component]] = {}
        self.groups: dict[str, gr.Group] = {}

    # -- handlers ------------------------------------------------------------------------------------------
    @ui_errors
    def refresh(self, request: gr.Request) -> tuple:
        """The list, the Delete choices and, for administrators, the Deploy/Delete forms."""
        user = self.ctx.user(request)
        rows = self.endpoints.list_endpoints(actor=user)
        deletable = [e.name for e in rows if not e.is_default]
        names = self.endpoints.role_names()
        return ([_row(e, names) for e in rows], gr.update(choices=deletable, value=None),
                gr.update(visible=can(user, "endpoint:create") or can(user, "endpoint:delete")))

    @ui_errors
    def roles_editor(self, request: gr.Request) -> tuple:
        """The Allowed roles editor: shown to holders of endpoint:update, with the endpoints they see and every
        role (the deploy form's roles dropdown gets the same choices)."""
        user = self.ctx.user(request)
        offered = choices(self.endpoints.role_names())
        if not can(user, "endpoint:update"):
            return gr.update(visible=False), gr.update(choices=[], value=None), gr.update(choices=offered, value=[]), \
                gr.update(choices=offered)
        listed = [e.name for e in self.endpoints.list_endpoints(actor=user)]
        return (gr.update(visible=True), gr.update(choices=listed, value=None), gr.update(choices=offered, value=[]),
                gr.update(choices=offered))

    @ui_errors
    def roles_of(self, name: str | None, request: gr.Request) -> Any:
        """The chosen endpoint's allowed roles, to edit."""
        if not name:
            return gr.update(value=[])
        endpoint = self.endpoints.get(actor=self.ctx.user(request), name=name)
        return gr.update(value=names_of(endpoint.allowed_roles, self.endpoints.role_names()))

    @ui_errors
    def save_roles(self, name: str | None, roles: list[str] | None, request: gr.Request) -> tuple:
        """Restrict the endpoint to users of ``roles`` (none: every user of endpoints); endpoint:update."""
        if not name:
            raise gr.Error("Choose the endpoint whose allowed roles to change")
        endpoint = self.endpoints.set_allowed_roles(actor=self.ctx.user(request), name=name, roles=list(roles or []))
        shown = ", ".join(names_of(endpoint.allowed_roles, self.endpoints.role_names())) or "every user of endpoints"
        gr.Info(translate(f"Endpoint {name} is now open to {shown}"))
        return self.refresh(request)

    @ui_errors
    def unmanaged(self, request: gr.Request) -> tuple[Any, Any]:
        """The account's SageMaker endpoints no studio endpoint stands for (administrators, SageMaker in use)."""
        user = self.ctx.user(request)
        if not can(user, "endpoint:create") or self.inventory is None or not self.inventory.enabled():
            return gr.update(value=[]), gr.update(visible=False)
        try:
            clouds = self.inventory.unmanaged(actor=user)
        except ServiceError as exc:
            return gr.update(value=[["", f"unknown: {exc.message}", "", "", "", ""]]), gr.update(visible=True)
        listed = [[c.name, c.status, c.endpoint_type, "" if c.current_instances is None else c.current_instances,
                   "yes (no row here)" if c.managed else "no",
                   c.created_at.strftime("%Y-%m-%d %H:%M:%S") if c.created_at else ""] for c in clouds]
        return gr.update(value=listed), gr.update(visible=True)

    @ui_errors
    def kind_changed(self, kind: str | None) -> list:
        return [gr.update(visible=name == kind) for name in self.groups]

    @ui_errors
    def autoscale_default(self, kind: str | None) -> Any:
        """The Autoscale box follows the chosen kind's default (on for SageMaker, as the seeds have it)."""
        model = options_model(kind) if kind else None
        return gr.update(value=bool(getattr(model, "default_autoscale", False)))

    @ui_errors
    def deploy(self, values: dict[Any, Any], request: gr.Request) -> tuple:
        """Values keyed by widget (Gradio passes a dict when inputs are a set); only the chosen kind's options
        are read."""
        kind = values.get(self.kind) or ""
        options: dict[str, Any] = {}
        for field in self.fields.get(kind, []):
            given, value = read_value(field, values.get(self.widgets[kind][field.name]))
            if given:
                options[field.name] = value
        request_ = Deployment(kind=kind, options=options, name=(values.get(self.name) or "").strip() or None,
                              min_instances=_whole(values.get(self.min_instances)),
                              max_instances=_whole(values.get(self.max_instances)),
                              autoscale=bool(values.get(self.autoscale)),
                              allowed_roles=tuple(values.get(self.deploy_roles) or ()))
        endpoint = self.admin.deploy(actor=self.ctx.user(request), request=request_)
        if endpoint.error:
            gr.Warning(translate(f"Endpoint {endpoint.name} is {endpoint.status}: {endpoint.error}"))
        else:
            gr.Info(translate(f"Endpoint {endpoint.name} is {endpoint.status}"))
        return (*self.refresh(request), "")

    @ui_errors
    def delete(self, name: str | None, confirmed: bool, force: bool, request: gr.Request) -> tuple:
        if not name:
            raise gr.Error("Choose the endpoint to delete")
        if not confirmed:
            raise gr.Error(f"Tick the box to confirm deleting {name}")
        moved = self.admin.delete(actor=self.ctx.user(request), name=name, force=bool(force))
        gr.Info(translate(f"Deleted endpoint {name}; {moved} queued job(s) moved to the default endpoint"))
        return (*self.refresh(request), False, False)

    # -- layout -----------------------------------------------------------------------------------------------
    def build(self) -> gr.Tab:
        with gr.Tab("Endpoints", id="endpoints") as tab:
            self.table = gr.Dataframe(headers=HEADERS, interactive=False, label="Endpoints", elem_id="endpoints-table")
            refresh = gr.Button("Refresh", size="sm", elem_id="endpoints-refresh")
            with gr.Column(visible=False, elem_id="endpoints-admin") as self.admin_area, gr.Row():
                with gr.Column(scale=2):
                    self._build_deploy()
                with gr.Column(scale=1):
                    gr.Markdown("### Delete")
                    self.delete_name = gr.Dropdown(label="Endpoint", choices=[], elem_id="endpoint-delete-name")
                    self.confirm = gr.Checkbox(label=CONFIRM_LABEL, value=False, elem_id="endpoint-delete-confirm")
                    self.force = gr.Checkbox(label=FORCE_LABEL, value=False, elem_id="endpoint-delete-force")
                    delete = gr.Button("Delete endpoint", variant="stop", elem_id="endpoint-delete")
            with gr.Column(visible=False, elem_id="endpoints-roles") as self.roles_area:
                gr.Markdown("### Allowed roles\nOnly users holding one of these roles see and use the endpoint; "
                            "none: every user of endpoints.")
                with gr.Row():
                    self.roles_endpoint = gr.Dropdown(label="Endpoint", choices=[], elem_id="endpoint-roles-name")
                    self.roles_value = gr.Dropdown(label="Allowed roles", choices=[], value=[], multiselect=True,
                                                   elem_id="endpoint-roles-value")
                    save_roles = gr.Button("Save allowed roles", size="sm", scale=0, min_width=160,
                                           elem_id="endpoint-roles-save")
            with gr.Column(visible=False, elem_id="endpoints-unmanaged") as self.unmanaged_area:
                gr.Markdown("### SageMaker endpoints not managed by this studio\nCreated outside the studio (or by one "
                            "whose database is gone). Deploy a `sagemaker` endpoint with `existing` ticked and "
                            "`sagemaker_name` set to use one here; it is never scaled or deleted by the studio.")
                self.unmanaged_table = gr.Dataframe(headers=UNMANAGED_HEADERS, interactive=False,
                                                    label="Unmanaged SageMaker endpoints", elem_id="endpoints-unmanaged-table")
        private = {"api_visibility": "private"}
        listing = [self.table, self.delete_name, self.admin_area]
        for trigger in (tab.select, refresh.click):
            trigger(self.refresh, None, listing, **private)
            trigger(self.unmanaged, None, [self.unmanaged_table, self.unmanaged_area], **private)
            trigger(self.roles_editor, None, [self.roles_area, self.roles_endpoint, self.roles_value,
                                              self.deploy_roles], **private)
        self.roles_endpoint.change(self.roles_of, [self.roles_endpoint], [self.roles_value], **private)
        save_roles.click(self.save_roles, [self.roles_endpoint, self.roles_value], listing, **private)
        self.kind.change(self.kind_changed, [self.kind], list(self.groups.values()), **private)
        self.kind.change(self.autoscale_default, [self.kind], [self.autoscale], **private)
        inputs = {self.kind, self.name, self.min_instances, self.max_instances, self.autoscale, self.deploy_roles}
        inputs |= {w for widgets in self.widgets.values() for w in widgets.values()}
        self.deploy_button.click(self.deploy, inputs, [*listing, self.name], **private)
        delete.click(self.delete, [self.delete_name, self.confirm, self.force], [*listing, self.confirm, self.force],
                     **private)
        return tab

    def _build_deploy(self) -> None:
        gr.Markdown("### Deploy")
        first = "http" if "http" in self.kinds else (self.kinds[0] if self.kinds else None)
        with gr.Row():
            self.name = gr.Textbox(label="Name", placeholder="empty: studio-<kind>-<id>", elem_id="endpoint-name")
            self.kind = gr.Dropdown(label="Kind", choices=self.kinds, value=first, elem_id="endpoint-kind")
        for kind in self.kinds:
            with gr.Group(visible=kind == first) as group:
                self.widgets[kind] = {f.name: build_widget(f, f"endpoint-{kind}-{f.name}".replace("_", "-"))
                                      for f in self.fields[kind]}
            self.groups[kind] = group
        with gr.Row():
            self.min_instances = gr.Number(label="Min instances", value=1, precision=0, minimum=0,
                                           elem_id="endpoint-min")
            self.max_instances = gr.Number(label="Max instances", value=1, precision=0, minimum=0,
                                           elem_id="endpoint-max")
            self.autoscale = gr.Checkbox(label="Autoscale", value=False, elem_id="endpoint-autoscale")
        self.deploy_roles = gr.Dropdown(label="Allowed roles (none: every user of endpoints)", choices=[], value=[],
                                        multiselect=True, elem_id="endpoint-allowed-roles")
        self.deploy_button = gr.Button("Deploy endpoint", variant="primary", elem_id="endpoint-deploy")


def _whole(value: Any) -> Any:
    """A Number widget's value as an int when it is whole (the service names anything else)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return 1 if value is None else value
