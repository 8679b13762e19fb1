"""HTML for jobs in the UI: the progress bar with preview, the result gallery, and the API (curl) text.

Result images are ``<img src="/files/jobs/<id>/<n>.png">`` — our authorised route — never Gradio
components holding the pixels, whose cached copies any signed-in user could open by URL. Everything
user-written (prompts, errors) is escaped before it reaches the page.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from webapp.records import Job, JobMode, JobStatus
from webapp.services.jobs import ProgressSnapshot

_BAR = ("height:10px;border-radius:5px;background:var(--neutral-200,#ddd);overflow:hidden;margin:4px 0")
_FILL = "height:100%;background:var(--color-accent,#f97316);width:{pct:.1f}%"


def image_url(job_id: str, index: int, *, download: bool = False) -> str:
    return f"/files/jobs/{job_id}/{index}.png" + ("?download=1" if download else "")


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA …"
    seconds = int(round(seconds))
    return f"ETA {seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"ETA {seconds} s"


def progress_html(snapshot: ProgressSnapshot | None, *, note: str = "") -> str:
    """The live bar: step/total, pass, percentage, ETA and the latest preview."""
    if snapshot is None:
        return f'<div class="studio-progress">{html.escape(note)}</div>' if note else ""
    if snapshot.status == JobStatus.QUEUED:
        ahead = snapshot.queue_position
        text = f"Queued ({ahead} job{'s' if ahead != 1 else ''} ahead)" if ahead else "Queued, starting…"
        return (f'<div class="studio-progress" data-status="queued" data-job="{snapshot.job_id}">'
                f'<div style="{_BAR}"><div style="{_FILL.format(pct=0)}"></div></div>{html.escape(text)}</div>')
    pct = snapshot.progress * 100
    parts = [f"Step {snapshot.step}/{snapshot.total}" if snapshot.total else (snapshot.note or "Starting…")]
    if snapshot.job_count > 1:
        parts.append(f"pass {snapshot.job_no + 1}/{snapshot.job_count}")
    parts += [f"{pct:.0f}%", _eta(snapshot.eta)]
    preview = ""
    if snapshot.preview_png:
        data = base64.b64encode(snapshot.preview_png).decode("ascii")
        preview = (f'<img class="studio-preview" alt="live preview" src="data:image/png;base64,{data}" '
                   'style="max-width:256px;max-height:256px;image-rendering:auto;margin-top:6px">')
    return (f'<div class="studio-progress" data-status="running" data-job="{snapshot.job_id}">'
            f'<div style="{_BAR}"><div style="{_FILL.format(pct=pct)}"></div></div>'
            f'<span class="studio-progress-text">{html.escape(" · ".join(parts))}</span><br>{preview}</div>')


def outcome_html(job: Job) -> str:
    """One line saying how a finished job ended (and why, when it failed)."""
    status = JobStatus(job.status)
    if status == JobStatus.SUCCEEDED:
        took = ""
        if job.started_at and job.finished_at:
            took = f" in {(job.finished_at - job.started_at).total_seconds():.1f} s"
        warnings = "".join(f'<li>{html.escape(w)}</li>' for w in job.warnings)
        extra = f'<ul class="studio-warnings">{warnings}</ul>' if warnings else ""
        return (f'<div class="studio-outcome" data-status="succeeded">Done{took} · job {job.id}</div>{extra}')
    if status == JobStatus.FAILED:
        return (f'<div class="studio-outcome" data-status="failed" style="color:var(--error-text-color,#b91c1c)">'
                f'Failed: {html.escape(job.error or "unknown error")}</div>')
    if status == JobStatus.CANCELLED:
        return '<div class="studio-outcome" data-status="cancelled">Cancelled</div>'
    return f'<div class="studio-outcome" data-status="{status}">{status.value.capitalize()}</div>'


def gallery_html(job: Job | None) -> str:
    """The job's images through our route, each with a download link that keeps the PNG infotext."""
    if job is None:
        return ""
    figures = []
    for index in range(len(job.image_keys)):
        url = image_url(job.id, index)
        figures.append(
            f'<figure style="margin:4px;display:inline-block;text-align:center">'
            f'<a href="{url}" target="_blank" rel="noopener"><img src="{url}" alt="image {index + 1} of job {job.id}" '
            f'class="studio-result" style="max-width:320px;max-height:320px;display:block"></a>'
            f'<figcaption>#{index + 1} · <a href="{image_url(job.id, index, download=True)}" '
            f'download="{job.id}-{index}.png">Download PNG</a></figcaption></figure>')
    return f'<div class="studio-gallery" data-job="{job.id}">{"".join(figures)}</div>'


def infotext_of(job: Job | None) -> str:
    return "\n\n".join(job.infotexts) if job is not None else ""


def details_markdown(job: Job) -> str:
    rows = [("Job", job.id), ("Owner", job.owner_name), ("Type", str(job.mode)), ("Status", str(job.status)),
            ("Endpoint", job.endpoint), ("Checkpoint", f"{job.checkpoint} [{job.checkpoint_hash}]"),
            ("Queued (UTC)", f"{job.created_at:%Y-%m-%d %H:%M:%S}"), ("Attempts", str(job.attempts))]
    if job.started_at:
        rows.append(("Started (UTC)", f"{job.started_at:%Y-%m-%d %H:%M:%S}"))
    if job.finished_at:
        rows.append(("Finished (UTC)", f"{job.finished_at:%Y-%m-%d %H:%M:%S}"))
    if job.error:
        rows.append(("Error", job.error))
    body = "\n".join(f"| {k} | {html.escape(v).replace('|', '&#124;')} |" for k, v in rows)
    return f"| | |\n|---|---|\n{body}"


# -- reproducing a job over the API -------------------------------------------------------------------

def reproduction(job: Job, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(path, body) of the A1111 call that reproduces ``job``: its request as submitted (``request``, from
    ``JobService.submitted_request``), with the seed it actually used and the exact checkpoint pinned, so a
    random seed or a changed default cannot drift."""
    body = dict(request)
    info = job.info or {}
    if body.get("seed") in (None, -1) and isinstance(info.get("seed"), int):
        body["seed"] = info["seed"]
    if body.get("subseed") in (None, -1) and isinstance(info.get("subseed"), int) and body.get("subseed_strength"):
        body["subseed"] = info["subseed"]
    settings = dict(body.get("override_settings") or {})
    if job.checkpoint:
        settings["sd_model_checkpoint"] = (f"{job.checkpoint} [{job.checkpoint_hash}]" if job.checkpoint_hash
                                           else job.checkpoint)
    body["override_settings"] = settings
    path = "/sdapi/v1/txt2img" if job.mode == JobMode.TXT2IMG else "/sdapi/v1/img2img"
    return path, body


def curl_command(job: Job, request: dict[str, Any], base_url: str, *, credentials: str = "USER:PASSWORD") -> str:
    """The curl call that reproduces ``job`` (the JSON goes through a quoted here-document: no escaping)."""
    path, body = reproduction(job, request)
    payload = json.dumps(body, indent=2, ensure_ascii=False)
    base = base_url.rstrip("/")
    jobs_body = json.dumps({"mode": str(job.mode), "request": body}, indent=2, ensure_ascii=False)
    return (
        f"# Reproduce job {job.id} (waits for the result, like A1111).\n"
        f"# Sign in with -u {credentials}, or with an API token: -H \"Authorization: Bearer $STUDIO_TOKEN\"\n"
        f"curl -sS -X POST '{base}{path}' -u '{credentials}' -H 'Content-Type: application/json' -d @- <<'JSON'\n"
        f"{payload}\nJSON\n\n"
        f"# Or queue it without waiting (returns the new job's id; follow it at /api/v1/jobs/<id>):\n"
        f"curl -sS -X POST '{base}/api/v1/jobs' -u '{credentials}' -H 'Content-Type: application/json' -d @- <<'JSON'\n"
        f"{jobs_body}\nJSON\n"
    )
