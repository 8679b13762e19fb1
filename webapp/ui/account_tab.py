"""Account tab (every user): personal API tokens, changing one's own password and the UI's language.

A token is shown once, right after it is created; only its hash is kept. Scripts send it as
``Authorization: Bearer <token>``; clients that only speak HTTP Basic (webuiapi, SillyTavern) use the
user's own name and password instead. A token may be limited to some of the user's permissions (scopes:
then it works on the APIs only) and may expire.
"""

from __future__ import annotations

import html

import gradio as gr

from webapp.i18n import LANGUAGES, translate
from webapp.records import ApiTokenPublic, User, utcnow
from webapp.services.access import ACTIONS, RESOURCES
from webapp.services.auth import AuthService
from webapp.services.jobs.quotas import JobQuotas, describe
from webapp.services.quota import DiskQuota, format_bytes
from webapp.services.tokens import MAX_EXPIRY_DAYS, TokenService
from webapp.ui.context import UiContext, ui_errors
from webapp.web.gate import SESSION_COOKIE

BROWSER_LANGUAGE = "browser"
LANGUAGE_CHOICES = [("Browser default", BROWSER_LANGUAGE), *((name, code) for code, name in LANGUAGES.items())]
# The page reloads after a change so that every label switches (Gradio picks its language when it boots).
RELOAD_JS = "() => { window.location.reload(); }"
HEADERS = ["Name", "Token starts with", "Created (UTC)", "Last used (UTC)", "Status", "Scopes", "Expires (UTC)"]
REVOKE_TOKENS_LABEL = "Also revoke API tokens"
USAGE = """Use a token instead of your password in scripts and editors:

```
curl -H "Authorization: Bearer stk_..." http://<server>/sdapi/v1/options
```

Clients that only support a user name and password (webuiapi, SillyTavern, Open WebUI) work with your
own login. A revoked token stops working at once.

**Scopes** limit a token to some of your permissions (always within the ones you hold at each request);
a scoped token works on the APIs only, not in this UI. Leave them empty for a token that can do what you
can. **Expires in days** bounds its life (at most 365); 0: until revoked."""


def _when(value) -> str:  # noqa: ANN001 - datetime or None
    return value.strftime("%Y-%m-%d %H:%M") if value else "never"


def _status(token: ApiTokenPublic) -> str:
    if token.revoked_at:
        return "revoked " + _when(token.revoked_at)
    if token.expires_at is not None and token.expires_at <= utcnow():
        return "expired"
    return "active"


def scope_choices(user: User) -> list[str]:
    """The permissions a token of ``user`` may be limited to: each one they hold, ``x:all`` first."""
    held = user.permissions
    return [f"{r}:{a}" for r in RESOURCES for a in ("all", *ACTIONS[:-1]) if f"{r}:{a}" in held]


def _days(value: float | str | None) -> float | None:
    """The Expires box: 0 or empty is None (no expiry; Gradio's Number sends 0 when cleared); the service
    checks the range."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        days = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"Expires in days must be a number, not {value!r}") from None
    return None if days == 0 else days


def _cookie(request: gr.Request) -> str | None:
    try:
        return dict(request.cookies).get(SESSION_COOKIE)
    except (AttributeError, TypeError):
        return None


class AccountTab:
    """Widgets and handlers; handlers are methods so tests can call them as Gradio would."""

    permission: str | None = None
    """Shown to users holding it (None: everyone)."""

    def __init__(self, ctx: UiContext, *, tokens: TokenService, auth: AuthService, quota: DiskQuota,
                 job_quotas: JobQuotas | None = None) -> None:
        self.ctx = ctx
        self.tokens = tokens
        self.auth = auth
        self.quota = quota
        self.job_quotas = job_quotas

    def _rows(self, request: gr.Request) -> tuple[list[list[str]], list[tuple[str, str]]]:
        tokens = self.tokens.list_tokens(actor=self.ctx.user(request))
        rows = [[t.name, f"{t.prefix}…", _when(t.created_at), _when(t.last_used_at), _status(t),
                 ", ".join(t.scopes) if t.scopes is not None else "all of yours",
                 _when(t.expires_at) if t.expires_at else "never"] for t in tokens]
        choices = [(f"{t.name} ({t.prefix}…)", t.id) for t in tokens if t.revoked_at is None]
        return rows, choices

    @ui_errors
    def refresh(self, request: gr.Request) -> tuple:
        user = self.ctx.user(request)
        rows, choices = self._rows(request)
        badge = translate(" (administrator)") if user.is_admin else ""
        disk = self.quota.usage(actor=user)
        of = translate(f" of {format_bytes(disk.limit)}") if disk.limit is not None else translate(" (no limit)")
        whoami = translate(
            f"Signed in as **{html.escape(user.username)}**{badge} · Disk used: {format_bytes(disk.used)}{of}")
        if self.job_quotas is not None:
            jobs = [u for u in self.job_quotas.usage(actor=user) if u.name != "max_storage_mb"]  # disk: above
            whoami += "\n\n" + describe(jobs)
        return whoami, rows, gr.update(choices=choices, value=None)

    @ui_errors
    def scope_options(self, request: gr.Request) -> dict:
        """The Scopes box's choices: the caller's own permissions."""
        return gr.update(choices=scope_choices(self.ctx.user(request)))

    @ui_errors
    def create(self, name: str, request: gr.Request, scopes: list[str] | None = None,
               expires_in_days: float | str | None = None) -> tuple:
        """``scopes`` and ``expires_in_days`` come after ``request`` so earlier callers (name only) keep working."""
        token, public = self.tokens.create(actor=self.ctx.user(request), name=name,
                                           scopes=list(scopes) if scopes else None,
                                           expires_in_days=_days(expires_in_days))
        rows, choices = self._rows(request)
        gr.Info(translate(f"Token {public.name!r} created: copy it now, it will not be shown again"))
        return gr.update(value=token, visible=True), "", rows, gr.update(choices=choices, value=None)

    @ui_errors
    def revoke(self, token_id: str | None, request: gr.Request) -> tuple:
        if not token_id:
            raise gr.Error("Choose the token to revoke")
        revoked = self.tokens.revoke(actor=self.ctx.user(request), token_id=token_id)
        gr.Info(translate(f"Token {revoked.name!r} revoked"))
        rows, choices = self._rows(request)
        return rows, gr.update(choices=choices, value=None)

    @ui_errors
    def change_password(
        self, current: str, new: str, confirm: str, request: gr.Request, revoke_tokens: bool = True,
    ) -> tuple:
        if new != confirm:
            raise gr.Error("The new password and its confirmation differ")
        client = getattr(request, "client", None)
        self.auth.change_own_password(
            actor=self.ctx.user(request), current_password=current, new_password=new,
            keep_session=_cookie(request), client_address=getattr(client, "host", None),
            revoke_tokens=bool(revoke_tokens),
        )
        tokens = translate("your API tokens were revoked" if revoke_tokens else "your API tokens still work")
        gr.Info(translate(f"Password changed; your other sessions were signed out and {tokens}"))
        return "", "", ""

    @ui_errors
    def language(self, request: gr.Request) -> str:
        """The language choice shown: the user's, or the browser's default."""
        return self.ctx.user(request).language or BROWSER_LANGUAGE

    @ui_errors
    def set_language(self, choice: str | None, request: gr.Request) -> str:
        """Record the user's language (the browser default: none); the page then reloads in it."""
        language = None if choice in (None, "", BROWSER_LANGUAGE) else choice
        chosen = self.ctx.users.set_language(actor=self.ctx.user(request), language=language)
        return chosen or BROWSER_LANGUAGE

    def build(self) -> gr.Tab:
        with gr.Tab("Account", id="account") as tab:
            whoami = gr.Markdown(elem_id="account-user")
            with gr.Row():
                with gr.Column(scale=2):
                    gr.Markdown("### API tokens")
                    gr.Markdown(USAGE)
                    table = gr.Dataframe(headers=HEADERS, interactive=False, label="Your tokens",
                                         elem_id="tokens-table")
                    refresh = gr.Button("Refresh", size="sm", elem_id="refresh-tokens")
                    with gr.Row():
                        name = gr.Textbox(label="New token name", placeholder="e.g. laptop scripts",
                                          elem_id="token-name", scale=3)
                        create = gr.Button("Create token", variant="primary", elem_id="create-token", scale=1)
                    with gr.Row():
                        scopes = gr.Dropdown(label="Scopes (empty: all of your permissions)", choices=[],
                                             multiselect=True, elem_id="token-scopes", scale=3)
                        expires = gr.Number(label=f"Expires in days (0: never; at most {MAX_EXPIRY_DAYS})",
                                            value=0, minimum=0, maximum=MAX_EXPIRY_DAYS,
                                            elem_id="token-expires", scale=1)
                    shown = gr.Textbox(label="Your new token (shown only once: copy it now)", visible=False,
                                       interactive=False, buttons=["copy"], elem_id="new-token")
                    with gr.Row():
                        revoke_choice = gr.Dropdown(label="Token", choices=[], elem_id="revoke-token-choice", scale=3)
                        revoke = gr.Button("Revoke", variant="stop", elem_id="revoke-token", scale=1)
                with gr.Column(scale=1):
                    gr.Markdown("### Change password")
                    current = gr.Textbox(label="Current password", type="password", elem_id="current-password")
                    new = gr.Textbox(label="New password", type="password", elem_id="new-password")
                    confirm = gr.Textbox(label="Confirm new password", type="password", elem_id="confirm-password")
                    revoke_tokens = gr.Checkbox(value=True, label=REVOKE_TOKENS_LABEL, elem_id="revoke-tokens-on-change")
                    change = gr.Button("Change password", elem_id="change-password")
                    gr.Markdown("### Language")
                    language = gr.Dropdown(LANGUAGE_CHOICES, value=BROWSER_LANGUAGE, label="Language of the studio",
                                           interactive=True, elem_id="account-language")
                    save_language = gr.Button("Save language", elem_id="save-language")
        tab.select(self.refresh, None, [whoami, table, revoke_choice], api_visibility="private")
        tab.select(self.language, None, [language], api_visibility="private")
        save_language.click(self.set_language, [language], [language], api_visibility="private").success(
            None, js=RELOAD_JS)
        tab.select(self.scope_options, None, [scopes], api_visibility="private")
        refresh.click(self.refresh, None, [whoami, table, revoke_choice], api_visibility="private")
        create.click(self.create, [name, scopes, expires], [shown, name, table, revoke_choice],
                     api_visibility="private")
        revoke.click(self.revoke, [revoke_choice], [table, revoke_choice], api_visibility="private")
        change.click(self.change_password, [current, new, confirm, revoke_tokens], [current, new, confirm],
                     api_visibility="private")
        return tab
