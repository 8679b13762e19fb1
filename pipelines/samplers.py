"""A1111 sampler and schedule-type names mapped onto diffusers schedulers (a1111-api.md §10).

A1111 names a sampler ("DPM++ 2M") and a schedule type ("Karras") separately, and still accepts the
legacy combined names ("DPM++ 2M Karras") and k-diffusion aliases ("k_dpmpp_2m"). Each supported
sampler is built with ``Cls.from_config(base_config, **kwargs)`` so the checkpoint's own betas,
prediction type and offsets carry over. Samplers without a diffusers equivalent are rejected by name
instead of being silently swapped for something else; so are schedule types a scheduler cannot do.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pipelines.types import InvalidRequestError

logger = logging.getLogger(__name__)


_SIGMAS = frozenset({"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"})
_SPACING = frozenset({"timestep_spacing"})
# Schedule-related constructor arguments of each diffusers scheduler (diffusers 0.42), kept here so that
# validating a request does not import diffusers; a test checks the table against the real signatures.
SCHEDULE_ARGS: Mapping[str, frozenset[str]] = {
    "DPMSolverMultistepScheduler": _SIGMAS | _SPACING | {"use_lu_lambdas"},
    "DPMSolverSDEScheduler": _SIGMAS | _SPACING,
    "DPMSolverSinglestepScheduler": _SIGMAS,
    "KDPM2DiscreteScheduler": _SIGMAS | _SPACING,
    "KDPM2AncestralDiscreteScheduler": _SIGMAS | _SPACING,
    "EulerDiscreteScheduler": _SIGMAS | _SPACING,
    "EulerAncestralDiscreteScheduler": _SPACING,
    "HeunDiscreteScheduler": _SIGMAS | _SPACING,
    "LMSDiscreteScheduler": _SIGMAS | _SPACING,
    "DDIMScheduler": _SPACING,
    "PNDMScheduler": _SPACING,
    "UniPCMultistepScheduler": _SIGMAS | _SPACING,
    "LCMScheduler": _SPACING,
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    aliases: tuple[str, ...]
    scheduler_class: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    default_schedule: str | None = None  # schedule used on "Automatic", A1111's `options["scheduler"]`
    second_order: bool = False
    brownian_noise: bool = False
    note: str = ""


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    label: str
    kwargs: Mapping[str, Any]
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", ("k_dpmpp_2m",), "DPMSolverMultistepScheduler", {}, "karras"),
    SamplerSpec("DPM++ SDE", ("k_dpmpp_sde",), "DPMSolverSDEScheduler", {}, "karras",
                second_order=True, brownian_noise=True),
    SamplerSpec("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++"}, "exponential", brownian_noise=True),
    SamplerSpec("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "exponential", brownian_noise=True),
    SamplerSpec("DPM++ 2S a", ("k_dpmpp_2s_a",), "DPMSolverSinglestepScheduler", {}, "karras",
                note="nearest diffusers equivalent (single-step DPM-Solver++, not ancestral)"),
    SamplerSpec("Euler a", ("k_euler_a", "k_euler_ancestral"), "EulerAncestralDiscreteScheduler"),
    SamplerSpec("Euler", ("k_euler",), "EulerDiscreteScheduler"),
    SamplerSpec("LMS", ("k_lms",), "LMSDiscreteScheduler"),
    SamplerSpec("Heun", ("k_heun",), "HeunDiscreteScheduler", second_order=True),
    SamplerSpec("DPM2", ("k_dpm_2",), "KDPM2DiscreteScheduler", {}, "karras", second_order=True),
    SamplerSpec("DPM2 a", ("k_dpm_2_a",), "KDPM2AncestralDiscreteScheduler", {}, "karras", second_order=True),
    SamplerSpec("DDIM", ("ddim",), "DDIMScheduler"),
    SamplerSpec("PLMS", ("plms",), "PNDMScheduler", {"skip_prk_steps": True}),
    SamplerSpec("UniPC", ("unipc",), "UniPCMultistepScheduler"),
    SamplerSpec("LCM", ("k_lcm",), "LCMScheduler"),
)

# A1111 samplers diffusers cannot run; named so the error says why instead of "unknown sampler".
UNSUPPORTED_SAMPLERS: Mapping[str, tuple[str, ...]] = {
    "DPM fast": ("k_dpm_fast",),
    "DPM adaptive": ("k_dpm_ad",),
    "Restart": ("restart",),
    "DDIM CFG++": ("ddim_cfgpp",),
    "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",),
}

_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")

SCHEDULES: tuple[ScheduleSpec, ...] = (
    ScheduleSpec("automatic", "Automatic", {}),
    ScheduleSpec("uniform", "Uniform", {"timestep_spacing": "linspace"}),
    ScheduleSpec("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0),
    ScheduleSpec("exponential", "Exponential", {"use_exponential_sigmas": True}),
    ScheduleSpec("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, aliases=("SGMUniform",)),
    ScheduleSpec("normal", "Normal", {"timestep_spacing": "linspace"}),
    ScheduleSpec("ddim", "DDIM", {"timestep_spacing": "leading"}),
    ScheduleSpec("beta", "Beta", {"use_beta_sigmas": True}),
)

UNSUPPORTED_SCHEDULES: Mapping[str, str] = {
    "polyexponential": "Polyexponential", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple",
}


@dataclass(frozen=True)
class ResolvedSampler:
    """A sampler + schedule choice that is known to be buildable."""

    sampler: SamplerSpec
    schedule: ScheduleSpec  # as requested ("automatic" stays automatic)
    effective_schedule: ScheduleSpec | None  # what runs: the sampler default on automatic, None = scheduler default

    @property
    def name(self) -> str:
        return self.sampler.name

    @property
    def schedule_label(self) -> str:
        """The label A1111 writes as ``Schedule type``: the schedule actually used."""
        return (self.effective_schedule or self.schedule).label

    def scheduler_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self.sampler.kwargs)
        if self.effective_schedule is not None:
            accepted = SCHEDULE_ARGS[self.sampler.scheduler_class]
            # At most one sigma flag may be on: clear any the checkpoint's config carries.
            kwargs.update({flag: False for flag in _SIGMA_FLAGS if flag in accepted})
            kwargs.update(self.effective_schedule.kwargs)
        return kwargs


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().replace("_", " ").split())


@cache
def _accepted_kwargs(class_name: str) -> frozenset[str]:
    import diffusers

    return frozenset(inspect.signature(getattr(diffusers, class_name).__init__).parameters)


def _schedule_ok(sampler: SamplerSpec, schedule: ScheduleSpec) -> bool:
    return set(schedule.kwargs) <= SCHEDULE_ARGS[sampler.scheduler_class]


def _find_sampler(name: str) -> SamplerSpec | None:
    key = _norm(name)
    for spec in SAMPLERS:
        if key == _norm(spec.name) or key in (_norm(a) for a in spec.aliases):
            return spec
    return None


def _find_schedule(name: str) -> ScheduleSpec | None:
    key = _norm(name)
    for spec in SCHEDULES:
        if key in (_norm(spec.name), _norm(spec.label), *(_norm(a) for a in spec.aliases)):
            return spec
    return None


def _reject_unsupported_sampler(name: str, field_name: str) -> None:
    key = _norm(name)
    for bad, aliases in UNSUPPORTED_SAMPLERS.items():
        if key == _norm(bad) or key in (_norm(a) for a in aliases):
            raise InvalidRequestError(
                field_name, f"sampler {bad!r} has no diffusers equivalent and is not supported; "
                            f"choose one of: {', '.join(s.name for s in SAMPLERS)}")


def resolve(name: str | None, scheduler: str | None = None, *, field_name: str = "sampler_name") -> ResolvedSampler:
    """Resolve an A1111 sampler name/alias (or legacy "<sampler> <Schedule>") plus a schedule type.

    Raises ``InvalidRequestError`` listing the valid names when either is unknown or unsupported, and when
    the schedule cannot be expressed with that sampler's diffusers scheduler.
    """
    name = name or "DPM++ 2M"
    schedule_name = scheduler or "Automatic"
    spec = _find_sampler(name)
    if spec is None:
        # Legacy combined names: "DPM++ 2M Karras", "DPM2 a Karras", "DPM++ 2M SDE Exponential".
        for sched in SCHEDULES[1:]:
            for label in (sched.label, *sched.aliases):
                if _norm(name).endswith(" " + _norm(label)):
                    base = _find_sampler(name[: len(name.rstrip()) - len(label)].strip())
                    if base is not None:
                        spec = base
                        if _find_schedule(schedule_name) in (None, SCHEDULES[0]):
                            schedule_name = sched.name
                        break
            if spec is not None:
                break
    if spec is None:
        _reject_unsupported_sampler(name, field_name)
        raise InvalidRequestError(
            field_name, f"sampler {name!r} not found; valid samplers: {', '.join(s.name for s in SAMPLERS)}")
    schedule = _find_schedule(schedule_name)
    if schedule is None:
        field = "hr_scheduler" if field_name.startswith("hr_") else "scheduler"
        for key, label in UNSUPPORTED_SCHEDULES.items():
            if _norm(schedule_name) in (_norm(key), _norm(label)):
                raise InvalidRequestError(field, f"schedule type {label!r} has no diffusers equivalent; "
                                                 f"valid: {', '.join(s.label for s in SCHEDULES)}")
        raise InvalidRequestError(field, f"schedule type {schedule_name!r} not found; "
                                         f"valid: {', '.join(s.label for s in SCHEDULES)}")
    effective: ScheduleSpec | None = schedule
    if schedule.name == "automatic":
        effective = _find_schedule(spec.default_schedule) if spec.default_schedule else None
    if effective is not None and not _schedule_ok(spec, effective):
        if schedule.name == "automatic":  # the default is always expressible by construction; be safe
            effective = None
        else:
            ok = [s.label for s in SCHEDULES if s.name == "automatic" or _schedule_ok(spec, s)]
            field = "hr_scheduler" if field_name.startswith("hr_") else "scheduler"
            raise InvalidRequestError(
                field, f"schedule type {schedule.label!r} is not available for sampler {spec.name!r} "
                       f"(diffusers {spec.scheduler_class}); valid for it: {', '.join(ok)}")
    return ResolvedSampler(spec, schedule, effective)


_TEMPLATES: OrderedDict[tuple, Any] = OrderedDict()
_TEMPLATE_LIMIT = 64


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def build_scheduler(resolved: ResolvedSampler, base_config: Mapping[str, Any], *, seeds: Sequence[int] = ()):
    """A fresh diffusers scheduler for one pipeline call (schedulers keep per-run state).

    Construction can be slow (KDPM2 precomputes sigmas for every training step), so a template per
    (class, config, kwargs) is built once and deep-copied. ``seeds`` seed the Brownian tree of DPM++ SDE
    per image so that sampler is reproducible too.
    """
    import diffusers

    name = resolved.sampler.scheduler_class
    accepted = _accepted_kwargs(name)
    kwargs = resolved.scheduler_kwargs()
    config = {k: v for k, v in base_config.items() if not k.startswith("_") and k in accepted}
    key = (name, _freeze(config), _freeze(kwargs))
    template = _TEMPLATES.get(key)
    if template is None:
        template = getattr(diffusers, name).from_config(config, **kwargs)
        _TEMPLATES[key] = template
        while len(_TEMPLATES) > _TEMPLATE_LIMIT:
            _TEMPLATES.popitem(last=False)
    else:
        _TEMPLATES.move_to_end(key)
    scheduler = copy.deepcopy(template)
    if "noise_sampler_seed" in accepted and seeds:
        scheduler.noise_sampler_seed = [int(s) % 2**63 for s in seeds]
    return scheduler


def list_samplers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers`` items: ``{name, aliases, options}`` (option values are strings as in A1111)."""
    items = []
    for spec in SAMPLERS:
        options: dict[str, str] = {}
        if spec.default_schedule:
            options["scheduler"] = spec.default_schedule
        if spec.second_order:
            options["second_order"] = "True"
        if spec.brownian_noise:
            options["brownian_noise"] = "True"
        items.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
    return items


def list_schedulers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers`` items: ``{name, label, aliases, default_rho, need_inner_model}``."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
             "default_rho": s.default_rho, "need_inner_model": False} for s in SCHEDULES]
