"""DatasetService: kohya layout in the asset store, refusals that leave nothing, captions, resize, rules."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from tests.datasets.conftest import admin_of, jpeg, make_user, make_zip, png, row_count, stored
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from webapp.services.quota import QuotaExceeded


def test_uploaded_files_land_in_kohya_layout_with_captions_and_warnings(dstudio):
    alice = make_user(dstudio)
    created = dstudio.datasets.create(actor=alice, name="cats", repeats=3, files=[
        ("a.png", png()), ("a.txt", b"a cat, sitting"), ("b.jpg", jpeg()), ("c.png", png(64, 64)),
        ("c.txt", b""), ("orphan.txt", b"nobody"),
    ], captions={"b.jpg": "  given by form "})
    dataset = created.dataset
    assert sorted(stored(dstudio)) == [f"datasets/{dataset.id}/3_cats/{n}" for n in
                                      ("a.png", "a.txt", "b.jpg", "b.txt", "c.png", "c.txt")]
    items = dstudio.datasets.items(actor=alice, dataset_id=dataset.id)
    assert [(i.folder, i.repeats, i.file_name, i.caption) for i in items] == [
        ("3_cats", 3, "a.png", "a cat, sitting"), ("3_cats", 3, "b.jpg", "given by form"), ("3_cats", 3, "c.png", "")]
    assert dataset.image_count == 3 and (dataset.min_width, dataset.max_width, dataset.max_height) == (40, 64, 64)
    assert dataset.bytes == sum(b.size for b in dstudio.store.list(f"datasets/{dataset.id}/"))
    assert created.warnings == ["1 caption(s) have no image and were skipped: orphan.txt"]
    admin = dstudio.users.get_by_name("admin")
    assert dstudio.datasets.location(dataset, actor=admin) == str(dstudio.store.root / "datasets" / dataset.id) + "/"
    shown = dstudio.datasets.location(dataset, actor=alice)
    assert shown == f"asset store: datasets/{dataset.id}/" and str(dstudio.store.root) not in shown
    uncaptioned = dstudio.datasets.create(actor=alice, name="bare", files=[("x.png", png())])
    assert uncaptioned.warnings == ["1 image(s) have no caption: 1_bare/x.png"]


def test_zip_folders_give_repeats_and_a_wrapper_folder_is_dropped(dstudio):
    alice = make_user(dstudio)
    archive = make_zip({"train/10_sks dog/1.png": png(), "train/10_sks dog/1.txt": b"sks dog",
                        "train/2_style/2.png": png(), "__MACOSX/train/._1.png": b"junk", "train/.DS_Store": b"x"})
    dataset = dstudio.datasets.create_from_zip(actor=alice, name="dogs", zip_file=archive).dataset
    items = dstudio.datasets.items(actor=alice, dataset_id=dataset.id)
    assert [(i.folder, i.repeats, i.file_name) for i in items] == [("10_sks dog", 10, "1.png"), ("2_style", 2, "2.png")]
    flat = dstudio.datasets.create_from_zip(actor=alice, name="flat", repeats=5, zip_file=make_zip({"z.png": png()}))
    assert [i.folder for i in dstudio.datasets.items(actor=alice, dataset_id=flat.dataset.id)] == ["5_flat"]


@pytest.mark.parametrize(("entries", "symlinks", "message"), [
    ({"../evil.png": png()}, None, "climbs out"),
    ({"/etc/evil.png": png()}, None, "absolute path"),
    ({"C:/evil.png": png()}, None, "absolute path"),
    ({"1_a/ok.png": png()}, {"1_a/link.png": "/etc/passwd"}, "symbolic link"),
    ({"1_a/ok.png": png(), "1_a/notes.pdf": b"%PDF-1.4"}, None, "'1_a/notes.pdf' is neither an image"),
    ({"1_a/ok.png": png(), "1_a/fake.png": b"not an image at all"}, None, "`1_a/fake.png` is not a readable image"),
    ({"cats/ok.png": png(), "dogs/ok2.png": png()}, None, "folder 'cats' is not kohya's"),
    ({"0_cats/ok.png": png()}, None, "repeats must be between 1"),
    ({"1_a/deep/ok.png": png(), "2_b/x.png": png()}, None, "nested too deep"),
    ({"1_a/a.png": png(), "1_a/a.jpg": jpeg()}, None, "would share one caption file"),
])
def test_bad_zips_are_refused_by_name_and_leave_nothing(dstudio, entries, symlinks, message):
    alice = make_user(dstudio)
    with pytest.raises(InvalidInput, match=message) as info:
        dstudio.datasets.create_from_zip(actor=alice, name="bad", zip_file=make_zip(entries, symlinks=symlinks))
    assert info.value.field in ("zip", "files")
    assert stored(dstudio) == [] and row_count(dstudio) == (0, 0)


def test_zip_bombs_and_too_many_entries_are_refused_before_inflating(dstudio):
    alice = make_user(dstudio)
    bomb = make_zip({"1_a/ok.png": png(), "1_a/huge.txt": b"0" * (2 * 2**20)})  # 2 MB inflated, a few KB zipped
    assert bomb.getbuffer().nbytes < 20_000
    with pytest.raises(InvalidInput, match="inflates to more than 1 MB"):
        dstudio.datasets.create_from_zip(actor=alice, name="bomb", zip_file=bomb)
    many = make_zip({f"1_a/{i}.txt": b"x" for i in range(60)} | {"1_a/ok.png": png()})
    with pytest.raises(InvalidInput, match="at most 50"):
        dstudio.datasets.create_from_zip(actor=alice, name="many", zip_file=many)
    big_pixels = io.BytesIO()
    Image.new("1", (9000, 9000)).save(big_pixels, format="PNG")  # tiny file, 81 Mpx declared in its header
    with pytest.raises(InvalidInput, match="pixels"):
        dstudio.datasets.create(actor=alice, name="px", files=[("1_a/big.png", big_pixels.getvalue())])
    with pytest.raises(InvalidInput, match="cannot be read"):
        dstudio.datasets.create_from_zip(actor=alice, name="junk", zip_file=io.BytesIO(b"PK not really"))
    assert stored(dstudio) == [] and row_count(dstudio) == (0, 0)


def test_a_store_failure_midway_removes_what_was_stored(dstudio, monkeypatch):
    from deploy.storage.base import StorageError

    alice = make_user(dstudio)
    real_put, calls = dstudio.store.put, []

    def failing_put(key, *args, **kwargs):
        calls.append(key)
        if len(calls) == 3:
            raise StorageError("disk full")
        return real_put(key, *args, **kwargs)

    monkeypatch.setattr(dstudio.store, "put", failing_put)
    with pytest.raises(Exception, match="disk full"):
        dstudio.datasets.create(actor=alice, name="half", files=[("a.png", png()), ("a.txt", b"x"), ("b.png", png())])
    assert stored(dstudio) == [] and row_count(dstudio) == (0, 0)


def test_names_are_unique_per_owner_and_validated(dstudio):
    alice, bob = make_user(dstudio), make_user(dstudio, "bob")
    dstudio.datasets.create(actor=alice, name="mine", files=[("a.png", png())])
    dstudio.datasets.create(actor=bob, name="mine", files=[("a.png", png())])  # another owner: fine
    with pytest.raises(Conflict) as info:
        dstudio.datasets.create(actor=alice, name="mine", files=[("a.png", png())])
    assert info.value.field == "name"
    for bad in ("", "a/b", "../x", ".hidden"):
        with pytest.raises(InvalidInput) as info:
            dstudio.datasets.create(actor=alice, name=bad, files=[("a.png", png())])
        assert info.value.field == "name"
    with pytest.raises(InvalidInput) as info:
        dstudio.datasets.create(actor=alice, name="r", repeats=0, files=[("a.png", png())])
    assert info.value.field == "repeats"


def test_caption_edit_updates_row_file_and_bytes(dstudio):
    alice = make_user(dstudio)
    dataset = dstudio.datasets.create(actor=alice, name="cap", files=[("a.png", png())]).dataset
    item = dstudio.datasets.items(actor=alice, dataset_id=dataset.id)[0]
    before = dataset.bytes
    edited = dstudio.datasets.set_caption(actor=alice, dataset_id=dataset.id, item_id=item.id, caption=" new words ")
    assert edited.caption == "new words"
    with dstudio.store.open(f"datasets/{dataset.id}/1_cap/a.txt") as handle:
        assert handle.read() == b"new words"
    assert dstudio.datasets.get(actor=alice, dataset_id=dataset.id).bytes == before + len("new words")
    assert dstudio.datasets.set_caption(actor=alice, dataset_id=dataset.id, item_id=item.id, caption="").caption == ""
    with pytest.raises(NotFound):
        dstudio.datasets.set_caption(actor=alice, dataset_id=dataset.id, item_id="nope", caption="x")


@pytest.mark.parametrize(("mode", "source_size"), [("crop", (80, 40)), ("fit", (40, 80)), ("stretch", (50, 70))])
def test_resize_makes_a_new_dataset_at_the_resolution(dstudio, mode, source_size):
    alice = make_user(dstudio)
    source = dstudio.datasets.create(actor=alice, name="src", files=[
        ("2_x/a.png", png(*source_size)), ("2_x/a.txt", b"cap a"), ("2_x/b.jpg", jpeg(*source_size))]).dataset
    created = dstudio.datasets.resize(actor=alice, dataset_id=source.id, width=96, height=64, mode=mode).dataset
    assert created.id != source.id and created.name == "src 96x64" and created.source == "resize"
    items = dstudio.datasets.items(actor=alice, dataset_id=created.id)
    assert [(i.folder, i.repeats, i.file_name, i.caption) for i in items] == [
        ("2_x", 2, "a.png", "cap a"), ("2_x", 2, "b.jpg", None)]
    for item in items:
        data, content_type = dstudio.datasets.image_bytes(actor=alice, dataset_id=created.id, item_id=item.id)
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (96, 64) and image.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[content_type]
    assert (created.min_width, created.max_height) == (96, 64)
    assert [i.width for i in dstudio.datasets.items(actor=alice, dataset_id=source.id)] == [source_size[0]] * 2
    with pytest.raises(InvalidInput) as info:
        dstudio.datasets.resize(actor=alice, dataset_id=source.id, width=65, height=64)
    assert info.value.field == "width"
    with pytest.raises(InvalidInput) as info:
        dstudio.datasets.resize(actor=alice, dataset_id=source.id, width=64, height=64, mode="zoom", name="z")
    assert info.value.field == "mode"


def test_visibility_owner_and_admin_rules(dstudio):
    alice, bob = make_user(dstudio), make_user(dstudio, "bob")
    private = dstudio.datasets.create(actor=alice, name="p", files=[("a.png", png())]).dataset
    shared = dstudio.datasets.create(actor=alice, name="s", visibility="everyone", files=[("a.png", png())]).dataset
    with pytest.raises(NotFound):
        dstudio.datasets.get(actor=bob, dataset_id=private.id)
    with pytest.raises(NotFound):
        dstudio.datasets.items(actor=bob, dataset_id=private.id)
    assert [d.name for d in dstudio.datasets.list_datasets(actor=bob)] == ["s"]
    item = dstudio.datasets.items(actor=bob, dataset_id=shared.id)[0]
    with pytest.raises(PermissionDenied):
        dstudio.datasets.set_caption(actor=bob, dataset_id=shared.id, item_id=item.id, caption="mine now")
    with pytest.raises(PermissionDenied):
        dstudio.datasets.delete(actor=bob, dataset_id=shared.id)
    copy = dstudio.datasets.resize(actor=bob, dataset_id=shared.id, width=64, height=64).dataset  # a copy of his own
    assert copy.owner_id == bob.id
    admin = admin_of(dstudio)
    assert {d.name for d in dstudio.datasets.list_datasets(actor=admin)} == {"p", "s", "s 64x64"}
    dstudio.datasets.delete(actor=admin, dataset_id=private.id)
    assert not any(k.startswith(f"datasets/{private.id}/") for k in stored(dstudio))
    dstudio.datasets.delete(actor=alice, dataset_id=shared.id)
    assert {k.split("/")[1] for k in stored(dstudio)} == {copy.id} and row_count(dstudio) == (1, 1)


def test_datasets_count_against_the_quota(dstudio):
    alice = make_user(dstudio)  # quota: 0.001 GiB ≈ 1 MiB; the dataset limit is 1 MiB too
    noisy = io.BytesIO()
    Image.frombytes("RGB", (300, 300), random.Random(0).randbytes(300 * 300 * 3)).save(noisy, format="PNG")
    assert len(noisy.getvalue()) > 250_000  # noise does not compress: four of these pass the quota
    first = dstudio.datasets.create(actor=alice, name="one", files=[("a.png", noisy.getvalue())]).dataset
    assert dstudio.quota.usage(actor=alice).used >= first.bytes > 0
    with pytest.raises(QuotaExceeded):
        for n in range(8):
            dstudio.datasets.create(actor=alice, name=f"more{n}", files=[("a.png", noisy.getvalue())])
    names = {d.name for d in dstudio.datasets.list_datasets(actor=alice)}
    keys = {k.split("/")[1] for k in stored(dstudio)}
    assert len(keys) == len(names)  # the refused one left no blobs
    assert dstudio.quota.usage(actor=alice).used <= dstudio.quota.limit_for(alice)
