"""``/controlnet/*`` answers in sd-webui-controlnet's shapes, lists only the caller's ControlNet models, and
``/controlnet/detect`` runs the preprocessors with clear errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import ALICE, BOB
from tests.fixtures.images import bomb_png
from webapp.records import ModelRecord, ModelStatus, ModelType, Visibility

PUBLIC = "control_v11p_sd15_canny"
PRIVATE = "bobs_openpose"


@pytest.fixture(scope="module")
def studio(fake_studio):
    bob = fake_studio.user("bob")
    with fake_studio.studio.db.write() as session:
        session.add(ModelRecord(name=PUBLIC, type=ModelType.CONTROLNET, base="sd1", status=ModelStatus.ACTIVE,
                                sha256="c1" * 32, autov2="c1" * 5))
        session.add(ModelRecord(name=PRIVATE, type=ModelType.CONTROLNET, base="sd1", status=ModelStatus.ACTIVE,
                                sha256="d2" * 32, autov2="d2" * 5, owner_id=bob.id, visibility=Visibility.PRIVATE))
    return fake_studio


def _picture(width: int = 96, height: int = 64) -> str:
    rng = np.random.default_rng(0)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[16:48, 20:70] = 255  # a hard-edged rectangle over faint noise
    pixels += rng.integers(0, 40, pixels.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _map(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("L"))


def test_version_settings_and_module_list(studio):
    c = studio.client
    assert c.get("/controlnet/version", auth=ALICE).json() == {"version": 3}
    assert c.get("/controlnet/settings", auth=ALICE).json() == {"control_net_unit_count": 3}
    modules = c.get("/controlnet/module_list", auth=ALICE).json()
    assert "canny" in modules["module_list"] and modules["module_detail"]["canny"]["sliders"][1]["name"]
    aliases = c.get("/controlnet/module_list?alias_names=true", auth=ALICE).json()
    assert set(aliases["module_detail"]) == set(aliases["module_list"]) and "depth_midas" in aliases["module_list"]
    assert c.get("/controlnet/version").status_code == 401


def test_model_lists_hold_only_the_callers_models(studio):
    c = studio.client
    public, private = f"{PUBLIC} [{'c1' * 4}]", f"{PRIVATE} [{'d2' * 4}]"
    assert c.get("/controlnet/model_list?update=true", auth=ALICE).json() == {"model_list": [public]}
    assert c.get("/controlnet/model_list", auth=BOB).json() == {"model_list": [private, public]}
    types = c.get("/controlnet/control_types", auth=ALICE).json()["control_types"]
    assert types["Canny"]["model_list"] == ["None", public] and types["Canny"]["default_model"] == public
    assert private not in str(types)


def test_detect_canny_follows_the_thresholds(studio):
    c, image = studio.client, _picture()
    low = c.post("/controlnet/detect", auth=ALICE, json={
        "controlnet_module": "canny", "controlnet_input_images": [image], "controlnet_processor_res": 64,
        "controlnet_threshold_a": 1, "controlnet_threshold_b": 10})
    high = c.post("/controlnet/detect", auth=ALICE, json={
        "controlnet_module": "canny", "controlnet_input_images": [image], "controlnet_processor_res": 64,
        "controlnet_threshold_a": 200, "controlnet_threshold_b": 250})
    assert low.status_code == 200 and high.status_code == 200, low.text
    assert low.json()["info"] == "Success" and "poses" not in low.json()
    low_map, high_map = _map(low.json()["images"][0]), _map(high.json()["images"][0])
    assert (low_map > 0).sum() > (high_map > 0).sum() > 0


def test_detect_a_second_weight_free_module(studio):
    c, image = studio.client, _picture()
    maps = [c.post("/controlnet/detect", auth=ALICE, json={
        "controlnet_module": "scribble_xdog", "controlnet_input_images": [image, image],
        "controlnet_processor_res": 64, "controlnet_threshold_a": value}).json()["images"] for value in (3, 60)]
    assert len(maps[0]) == 2
    assert not np.array_equal(_map(maps[0][0]), _map(maps[1][0]))


def test_detect_refuses_unknown_modules_bad_images_and_too_many(studio):
    c, image = studio.client, _picture()
    unknown = c.post("/controlnet/detect", auth=ALICE, json={"controlnet_module": "nope",
                                                           "controlnet_input_images": [image]})
    assert unknown.status_code == 422 and unknown.json()["field"] == "controlnet_module"
    assert {"error", "detail"} <= set(unknown.json())
    bomb = base64.b64encode(bomb_png(40000, 40000)).decode()
    bombed = c.post("/controlnet/detect", auth=ALICE, json={"controlnet_module": "canny",
                                                          "controlnet_input_images": [image, bomb]})
    assert bombed.status_code == 422 and bombed.json()["field"] == "controlnet_input_images[1]"
    many = c.post("/controlnet/detect", auth=ALICE, json={"controlnet_module": "canny",
                                                        "controlnet_input_images": [image] * 5})
    assert many.status_code == 422 and many.json()["field"] == "controlnet_input_images"


def test_a_missing_annotator_names_the_file_and_folder(studio):
    answer = studio.client.post("/controlnet/detect", auth=ALICE, json={
        "controlnet_module": "lineart", "controlnet_input_images": [_picture()]})
    assert answer.status_code == 503 and answer.json()["field"] == "controlnet_module"
    assert "sk_model.pth" in answer.json()["detail"]
    assert str(studio.studio.settings.annotators_dir) in answer.json()["detail"]


def test_render_openpose_json_draws_each_pose_as_the_preprocessor_does(studio):
    from controlnet_aux.open_pose import draw_poses

    from pipelines.controlnet.poses import pose_json
    from tests.pipelines.test_controlnet_poses import H, W, detected_poses

    c, poses = studio.client, detected_poses()
    sent = pose_json(poses, W, H)
    answer = c.post("/controlnet/render_openpose_json", auth=ALICE, json=[sent, {**sent, "people": sent["people"][1:]}])
    assert answer.status_code == 200 and answer.json()["info"] == "Success"
    first, second = (np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in answer.json()["images"])
    assert np.array_equal(first, draw_poses(poses, H, W)) and np.array_equal(second, draw_poses(poses[1:], H, W))
    assert c.post("/controlnet/render_openpose_json", auth=ALICE, json=[]).json() == {"info": "No pose data detected."}
    assert c.post("/controlnet/render_openpose_json", json=[sent]).status_code == 401


def test_render_openpose_json_refuses_too_many_big_or_broken_poses(studio):
    c = studio.client
    pose = {"people": [], "canvas_width": 64, "canvas_height": 64}
    many = c.post("/controlnet/render_openpose_json", auth=ALICE, json=[pose] * 5)
    assert many.status_code == 422 and many.json()["field"] == "pose_data"
    huge = c.post("/controlnet/render_openpose_json", auth=ALICE,
                  json=[pose, {**pose, "canvas_width": 8192, "canvas_height": 8192}])
    assert huge.status_code == 422 and huge.json()["field"] == "pose_data[1].canvas_width"
    broken = c.post("/controlnet/render_openpose_json", auth=ALICE,
                    json=[{**pose, "people": [{"pose_keypoints_2d": [1, 2, 1] * 5}]}])
    assert broken.status_code == 422 and broken.json()["field"] == "pose_data[0].people[0].pose_keypoints_2d"
    assert c.post("/controlnet/render_openpose_json", auth=ALICE, json={"people": []}).status_code == 422
