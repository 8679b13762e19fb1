"""/api/v1/datasets over HTTP: multipart create (files or zip), browse, caption, resize, delete, 4xx naming fields."""

from __future__ import annotations

import json

from tests.datasets.conftest import http_as, jpeg, make_user, make_zip, png, row_count, stored


def test_create_browse_caption_resize_delete_over_http(dstudio):
    make_user(dstudio)
    alice = http_as(dstudio, "alice")
    response = alice.post("/api/v1/datasets", data={"name": "cats", "repeats": "4", "captions": json.dumps(
        {"b.jpg": "from the form"})}, files=[("files", ("a.png", png(), "image/png")),
                                             ("files", ("a.txt", b"a cat", "text/plain")),
                                             ("files", ("b.jpg", jpeg(), "image/jpeg")),
                                             ("files", ("c.png", png(), "image/png"))])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["image_count"] == 3 and body["warnings"] == ["1 image(s) have no caption: 4_cats/c.png"]
    assert body["location"] == f"asset store: datasets/{body['id']}/" and body["owner"] == "alice"
    page = alice.get(f"/api/v1/datasets/{body['id']}", params={"limit": 2, "offset": 1}).json()
    assert [(i["path"], i["caption"]) for i in page["items"]] == [("4_cats/b.jpg", "from the form"), ("4_cats/c.png", None)]
    item = page["items"][1]
    image = alice.get(f"/api/v1/datasets/{body['id']}/items/{item['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == png()
    edited = alice.patch(f"/api/v1/datasets/{body['id']}/items/{item['id']}", json={"caption": "a third cat"})
    assert edited.status_code == 200 and edited.json()["caption"] == "a third cat"
    resized = alice.post(f"/api/v1/datasets/{body['id']}/resize", json={"width": 64, "height": 64, "name": "cats64"})
    assert resized.status_code == 201 and resized.json()["resolution"]["max_width"] == 64
    listed = alice.get("/api/v1/datasets").json()
    assert listed["total"] == 2 and [d["name"] for d in listed["items"]] == ["cats", "cats64"]
    assert alice.delete(f"/api/v1/datasets/{body['id']}").status_code == 204
    assert alice.get(f"/api/v1/datasets/{body['id']}").status_code == 404
    assert {k.split("/")[1] for k in stored(dstudio)} == {resized.json()["id"]}


def test_zip_over_http_and_refusals_name_the_field(dstudio):
    make_user(dstudio)
    alice = http_as(dstudio, "alice")
    ok = alice.post("/api/v1/datasets", data={"name": "z"},
                    files={"zip": ("d.zip", make_zip({"3_x/a.png": png(), "3_x/a.txt": b"cap"}).getvalue())})
    assert ok.status_code == 201 and ok.json()["image_count"] == 1
    slip = alice.post("/api/v1/datasets", data={"name": "evil"},
                      files={"zip": ("d.zip", make_zip({"../../a.png": png()}).getvalue())})
    assert slip.status_code == 422 and slip.json()["field"] == "zip" and "climbs out" in slip.json()["detail"]
    link = alice.post("/api/v1/datasets", data={"name": "evil"}, files={"zip": (
        "d.zip", make_zip({"1_a/a.png": png()}, symlinks={"1_a/b.png": "/etc/passwd"}).getvalue())})
    assert link.status_code == 422 and "symbolic link" in link.json()["detail"]
    neither = alice.post("/api/v1/datasets", data={"name": "none"})
    assert neither.status_code == 422 and neither.json()["field"] == "files"
    pdf = alice.post("/api/v1/datasets", data={"name": "pdf"}, files=[("files", ("x.pdf", b"%PDF", "application/pdf"))])
    assert pdf.status_code == 422 and "'x.pdf' is neither an image" in pdf.json()["detail"]
    bad_captions = alice.post("/api/v1/datasets", data={"name": "c", "captions": "{oops"},
                              files=[("files", ("a.png", png(), "image/png"))])
    assert bad_captions.status_code == 422 and bad_captions.json()["field"] == "captions"
    bad_size = alice.post(f"/api/v1/datasets/{ok.json()['id']}/resize", json={"width": 63, "height": 64})
    assert bad_size.status_code == 422 and bad_size.json()["field"] == "width"
    assert row_count(dstudio) == (1, 1) and len(stored(dstudio)) == 2


def test_another_user_gets_404_on_a_private_dataset_and_403_on_a_shared_one(dstudio):
    make_user(dstudio), make_user(dstudio, "bob")
    alice, bob = http_as(dstudio, "alice"), http_as(dstudio, "bob")
    private = alice.post("/api/v1/datasets", data={"name": "p"}, files=[("files", ("a.png", png(), "image/png"))]).json()
    shared = alice.post("/api/v1/datasets", data={"name": "s", "visibility": "everyone"},
                        files=[("files", ("a.png", png(), "image/png"))]).json()
    assert bob.get(f"/api/v1/datasets/{private['id']}").status_code == 404
    assert bob.delete(f"/api/v1/datasets/{private['id']}").status_code == 404
    item = bob.get(f"/api/v1/datasets/{shared['id']}").json()["items"][0]
    assert bob.get(f"/api/v1/datasets/{private['id']}/items/{item['id']}/image").status_code == 404
    refused = bob.patch(f"/api/v1/datasets/{shared['id']}/items/{item['id']}", json={"caption": "x"})
    assert refused.status_code == 403 and refused.json()["field"] == "dataset_id"
    assert bob.delete(f"/api/v1/datasets/{shared['id']}").status_code == 403
    assert [d["name"] for d in bob.get("/api/v1/datasets").json()["items"]] == ["s"]
    assert bob.patch(f"/api/v1/datasets/{private['id']}", json={"visibility": "everyone"}).status_code == 404
    shared_now = alice.patch(f"/api/v1/datasets/{private['id']}", json={"visibility": "everyone", "name": "p2"})
    assert shared_now.status_code == 200 and shared_now.json()["name"] == "p2"
    assert bob.get(f"/api/v1/datasets/{private['id']}").status_code == 200
    assert alice.patch(f"/api/v1/datasets/{private['id']}", json={"name": "s"}).json()["field"] == "name"
    admin = http_as(dstudio, "admin")
    assert admin.delete(f"/api/v1/datasets/{private['id']}").status_code == 204
