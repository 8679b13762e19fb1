"""ControlNet units in the shared request path: parsed, their models resolved as the submitting user and checked
against the checkpoint's base, and carried (units and model files, in unit order) to the backend."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.model_files import ModelFileRef
from tests.fixtures.images import png_b64
from webapp.records import ModelRecord, ModelStatus, ModelType, User, Visibility
from webapp.services.errors import InvalidInput
from webapp.services.jobs.requests import RequestResolver

_MODEL_USERS = json.dumps(["model:list", "model:use"])  # the resolver checks model:use on every model
ALICE = User(id=1, username="alice", permissions_json=_MODEL_USERS)
BOB = User(id=2, username="bob", permissions_json=_MODEL_USERS)


def _record(name: str, model_type: ModelType, base: str, sha: str, owner: int | None = None,
            visibility: Visibility = Visibility.EVERYONE) -> ModelRecord:
    return ModelRecord(name=name, type=model_type, base=base, status=ModelStatus.ACTIVE, sha256=sha * 32,
                       autov2=(sha * 5)[:10], owner_id=owner, visibility=visibility)


class FakeRegistry:
    """Exact names and ``name [hash8]`` titles; private models are visible to their owner only."""

    def __init__(self, records: list[ModelRecord]) -> None:
        self.records = records

    def list_models(self, *, actor: User, type: ModelType | None = None, **kwargs: Any) -> list[ModelRecord]:  # noqa: A002
        return [r for r in self.records if (type is None or r.type == type)
                and (r.visibility == Visibility.EVERYONE or r.owner_id == actor.id)]

    def find(self, *, actor: User, type: ModelType, ref: str) -> ModelRecord | None:  # noqa: A002
        for record in self.list_models(actor=actor, type=type):
            if ref in (record.name, f"{record.name} [{record.sha256[:8]}]"):
                return record
        return None

    def file_ref(self, record: ModelRecord) -> ModelFileRef:
        return ModelFileRef(sha256=record.sha256, store_key=f"models/{record.name}", local_path=None, size=1)


REGISTRY = FakeRegistry([
    _record("tiny15", ModelType.CHECKPOINT, "sd1", "a1"),
    _record("tinyxl", ModelType.CHECKPOINT, "sdxl", "a2"),
    _record("control_canny", ModelType.CONTROLNET, "sd1", "c1"),
    _record("control_pose_xl", ModelType.CONTROLNET, "sdxl", "c2"),
    _record("bobs_secret", ModelType.CONTROLNET, "sd1", "c3", owner=2, visibility=Visibility.PRIVATE),
])


def _request(*units: dict, checkpoint: str = "tiny15") -> dict[str, Any]:
    return {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "sd_model_checkpoint": checkpoint,
            "alwayson_scripts": {"ControlNet": {"args": list(units)}}}


def _refused(request: dict[str, Any], actor: User = ALICE) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        RequestResolver(REGISTRY).prepare(actor=actor, mode="txt2img", request=request)
    return caught.value


def test_no_enabled_units_submit_as_before():
    prepared = RequestResolver(REGISTRY).prepare(
        actor=ALICE, mode="txt2img", request=_request({"enabled": False, "model": "nothing", "module": "canny"}))
    assert prepared.models.controlnets == () and prepared.controlnet_units == ()


def _prepared(request: dict[str, Any], actor: User = ALICE):
    return RequestResolver(REGISTRY).prepare(actor=actor, mode="txt2img", request=request)


def test_well_formed_units_resolve_to_their_models_in_unit_order():
    prepared = _prepared(_request({"module": "canny", "model": "CONTROL_CANNY", "image": png_b64(8, 8)},
                                  {"enabled": False, "model": "nothing"},
                                  {"module": "none", "model": f"control_canny [{'c1' * 4}]", "weight": 0.5}))
    assert [spec.name for spec in prepared.models.controlnets] == ["control_canny", "control_canny"]
    assert [(u.module, u.weight) for u in prepared.controlnet_units] == [("canny", 1.0), ("none", 0.5)]


def test_a_malformed_unit_is_refused_naming_its_field():
    error = _refused(_request({"module": "none", "model": "control_canny"}, {"module": "canny", "weight": 3}))
    assert error.field == "alwayson_scripts.controlnet.args[1].weight"


@pytest.mark.parametrize("model", ["no_such_model", "None", "bobs_secret"])
def test_unknown_missing_or_private_models_are_refused_naming_the_unit(model):
    error = _refused(_request({"module": "canny", "model": model}))
    assert error.field == "alwayson_scripts.controlnet.args[0].model"
    listing = str(error).split("choose one of:")[1]
    assert "control_canny [c1c1c1c1]" in listing and "bobs_secret" not in listing


def test_the_owner_may_use_a_private_model():
    prepared = _prepared(_request({"module": "canny", "model": "bobs_secret"}), actor=BOB)
    assert [spec.name for spec in prepared.models.controlnets] == ["bobs_secret"]


def test_a_unit_of_another_base_is_refused_naming_the_unit():
    error = _refused(_request({"module": "none", "model": "control_canny"},
                              {"module": "openpose", "model": "control_canny"}, checkpoint="tinyxl"))
    assert error.field == "alwayson_scripts.controlnet.args[0].model"
    assert str(error) == "ControlNet unit 0 (control_canny) is sd1 but the checkpoint is sdxl"
    error = _refused(_request({"enabled": False}, {"module": "none", "model": "control_pose_xl"}))
    assert str(error) == "ControlNet unit 1 (control_pose_xl) is sdxl but the checkpoint is sd1"
