"""OpenPose JSON drawn back into pose maps: the same pixels as controlnet-aux draws for the detected poses,
from pixel or 0..1 coordinates, and hostile JSON refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.controlnet.poses import MAX_PEOPLE, pose_json, render_pose_json
from pipelines.types import InvalidRequestError

W, H = 128, 96
PIXELS = 512 * 512


def detected_poses():
    """Two people as controlnet-aux's detector returns them (0..1 coordinates on a grid the float math keeps
    exact), with missing body, hand and face points."""
    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    rng = np.random.default_rng(5)

    def points(count: int, missing: int, *, none: bool):
        out = [Keypoint(rng.integers(4, W - 4) / W, rng.integers(4, H - 4) / H) for _ in range(count)]
        for i in rng.choice(count, missing, replace=False):
            out[i] = None if none else Keypoint(-1, -1)
        return out

    return [PoseResult(BodyResult(points(18, 3, none=True), 10.0, 15), points(21, 2, none=False),
                       points(21, 0, none=False), points(70, 5, none=False)),
            PoseResult(BodyResult(points(18, 0, none=True), 10.0, 18), None, None, None)]


def test_rendered_json_equals_the_map_drawn_for_the_detected_poses():
    from controlnet_aux.open_pose import draw_poses

    poses = detected_poses()
    expected = draw_poses(poses, H, W)
    assert (expected > 0).any()
    sent = json.loads(json.dumps(pose_json(poses, W, H)))  # as a client sends it back
    assert np.array_equal(np.asarray(render_pose_json(sent, max_pixels=PIXELS)), expected)
    # 0..1 coordinates (some editors send them) draw the same
    normalized = {**sent, "people": [{k: [v / (W if i % 3 == 0 else H if i % 3 == 1 else 1) for i, v in enumerate(vs)]
                                      if vs else vs for k, vs in person.items()} for person in sent["people"]]}
    assert np.array_equal(np.asarray(render_pose_json(normalized, max_pixels=PIXELS)), expected)
    empty = render_pose_json({"people": [], "canvas_width": 64, "canvas_height": 32}, max_pixels=PIXELS)
    assert empty.size == (64, 32) and not np.asarray(empty).any()


def _pose(**person):
    return {"people": [{"pose_keypoints_2d": [10.0, 10.0, 1.0] * 18, **person}], "canvas_width": W, "canvas_height": H}


@pytest.mark.parametrize(("pose", "field", "message"), [
    ({"people": [], "canvas_width": 0, "canvas_height": 8}, "p.canvas_width", "from 1 to 8192"),
    ({"people": [], "canvas_width": "64", "canvas_height": 8}, "p.canvas_width", "whole number"),
    ({"people": [], "canvas_width": 4096, "canvas_height": 4096}, "p.canvas_width", "at most 262144"),
    ({"people": [{}] * (MAX_PEOPLE + 1), "canvas_width": 8, "canvas_height": 8}, "p.people", "at most 100"),
    ({"people": ["x"], "canvas_width": 8, "canvas_height": 8}, "p.people[0]", "JSON object"),
    (_pose(pose_keypoints_2d=[1.0, 2.0, 1.0] * 17), "p.people[0].pose_keypoints_2d", "hold 18 points"),
    (_pose(hand_left_keypoints_2d=[1.0, 2.0]), "p.people[0].hand_left_keypoints_2d", "x, y, confidence"),
    (_pose(face_keypoints_2d=[1.0, 2.0, 1.0] * 71), "p.people[0].face_keypoints_2d", "1 to 70 points"),
    (_pose(hand_right_keypoints_2d=[float("nan"), 2.0, 1.0] * 21), "p.people[0].hand_right_keypoints_2d", "finite"),
    ("not a pose", "p", "JSON object"),
])
def test_bad_pose_json_is_refused_naming_the_field(pose, field, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        render_pose_json(pose, max_pixels=PIXELS, field="p")
    assert info.value.field == field
