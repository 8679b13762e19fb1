"""OpenPose JSON: written from the poses controlnet-aux detects, and drawn back into a pose map.

The JSON is the one sd-webui-controlnet's `/controlnet/detect` returns and its `render_openpose_json` reads
(the pose editors send it): ``{"people": [{"pose_keypoints_2d": [x, y, c, ...], "hand_left_keypoints_2d",
"hand_right_keypoints_2d", "face_keypoints_2d"}], "canvas_width", "canvas_height"}``. Points are pixels of
the canvas, or 0..1 fractions of it when every point of a list is within [0, 1] (editors send both); a point
with confidence 0 is missing. Drawing goes through controlnet-aux's own `draw_poses`, so a rendered map looks
exactly like the map the openpose preprocessors draw.

The JSON comes from strangers, so it is checked before drawing: canvas size (bounded by the caller's pixel
limit), people per canvas, and the point counts controlnet-aux's drawing indexes (18 body points, 21 per hand,
at most 70 face points). Errors name the field, e.g. ``pose_data[0].people[2].hand_left_keypoints_2d``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipelines.types import InvalidRequestError

MAX_PEOPLE = 100
BODY_POINTS = 18  # COCO order, as controlnet-aux draws them
HAND_POINTS = 21
MAX_FACE_POINTS = 70
MAX_SIDE = 8192
_LISTS = {"pose_keypoints_2d": (BODY_POINTS, BODY_POINTS), "hand_left_keypoints_2d": (HAND_POINTS, HAND_POINTS),
          "hand_right_keypoints_2d": (HAND_POINTS, HAND_POINTS), "face_keypoints_2d": (1, MAX_FACE_POINTS)}


def pose_json(poses: Sequence[Any], width: int, height: int, *, canvas: tuple[int, int] | None = None
              ) -> dict[str, Any]:
    """controlnet-aux poses (coordinates relative to `width` x `height`) as OpenPose JSON in pixels, the shape
    the extension's `/controlnet/detect` returns and its `render_openpose_json` reads; missing points 0,0,0."""

    def flat(points: Sequence[Any] | None) -> list[float] | None:
        if not points:
            return None
        out: list[float] = []
        for p in points:
            present = p is not None and p.x >= 0 and p.y >= 0
            out += [float(p.x) * width, float(p.y) * height, 1.0] if present else [0.0, 0.0, 0.0]
        return out

    canvas_w, canvas_h = canvas or (width, height)
    people = [{"pose_keypoints_2d": flat(pose.body.keypoints), "face_keypoints_2d": flat(pose.face),
               "hand_left_keypoints_2d": flat(pose.left_hand), "hand_right_keypoints_2d": flat(pose.right_hand)}
              for pose in poses]
    return {"people": people, "canvas_width": canvas_w, "canvas_height": canvas_h}


def _canvas(pose: Mapping[str, Any], field: str, max_pixels: int) -> tuple[int, int]:
    sides = []
    for key in ("canvas_width", "canvas_height"):
        value = pose.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
            raise InvalidRequestError(f"{field}.{key}", f"`{key}` must be a whole number from 1 to {MAX_SIDE} but "
                                                        f"is {value!r}")
        sides.append(value)
    width, height = sides
    if width * height > max_pixels:
        raise InvalidRequestError(f"{field}.canvas_width", f"a {width}x{height} canvas has {width * height} pixels; "
                                                           f"at most {max_pixels}")
    return width, height


def _points(values: Any, key: str, field: str, width: int, height: int) -> list[tuple[float, float] | None] | None:
    """(x, y) fractions of the canvas per point, None for a missing point; None when the list is absent."""
    if values is None or (isinstance(values, list) and not values):
        return None
    least, most = _LISTS[key]
    if (not isinstance(values, list) or len(values) % 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise InvalidRequestError(field, f"`{key}` must be a list of finite numbers, x, y, confidence per point")
    count = len(values) // 3
    if not least <= count <= most:
        wanted = f"{least}" if least == most else f"1 to {most}"
        raise InvalidRequestError(field, f"`{key}` must hold {wanted} points (x, y, confidence each) but holds {count}")
    triples = [values[i:i + 3] for i in range(0, len(values), 3)]
    present = [(x, y) for x, y, c in triples if c > 0]
    scale = (1.0, 1.0) if all(0 <= x <= 1 and 0 <= y <= 1 for x, y in present) else (float(width), float(height))
    return [(x / scale[0], y / scale[1]) if c > 0 else None for x, y, c in triples]


def read_pose_json(pose: Mapping[str, Any], *, max_pixels: int, field: str = "pose") -> tuple[list[Any], int, int]:
    """Check one OpenPose JSON canvas and turn it into controlnet-aux poses, with its width and height."""
    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    if not isinstance(pose, Mapping):
        raise InvalidRequestError(field, f"each pose must be a JSON object, not {type(pose).__name__}")
    width, height = _canvas(pose, field, max_pixels)
    people = pose.get("people") or []
    if not isinstance(people, list) or len(people) > MAX_PEOPLE:
        raise InvalidRequestError(f"{field}.people", f"`people` must be a list of at most {MAX_PEOPLE} people")
    results = []
    for index, person in enumerate(people):
        where = f"{field}.people[{index}]"
        if not isinstance(person, Mapping):
            raise InvalidRequestError(where, "each person must be a JSON object")
        # controlnet-aux skips a missing body point (None) but draws every hand and face point: off-canvas ones
        # (-1, -1) are the points it leaves out
        lists: dict[str, list[Keypoint | None] | None] = {}
        for key in _LISTS:
            found = _points(person.get(key), key, f"{where}.{key}", width, height)
            missing = None if key == "pose_keypoints_2d" else Keypoint(-1.0, -1.0)
            lists[key] = None if found is None else [Keypoint(*p) if p else missing for p in found]
        body = lists["pose_keypoints_2d"] or [None] * BODY_POINTS
        results.append(PoseResult(BodyResult(body, 0.0, sum(p is not None for p in body)),
                                  lists["hand_left_keypoints_2d"], lists["hand_right_keypoints_2d"],
                                  lists["face_keypoints_2d"]))
    return results, width, height


def render_pose_json(pose: Mapping[str, Any], *, max_pixels: int, field: str = "pose") -> Image.Image:
    """The pose map of one OpenPose JSON canvas (black background), as the openpose preprocessors draw it."""
    from controlnet_aux.open_pose import draw_poses

    poses, width, height = read_pose_json(pose, max_pixels=max_pixels, field=field)
    return Image.fromarray(np.ascontiguousarray(draw_poses(poses, height, width)))
