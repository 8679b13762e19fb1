"""Models tab: a narrow table (no hashes), a details panel with the hashes (server paths for admins only),
and the server import folders shown to administrators (the default one exists from the start)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

from tests.models.conftest import make_user
from webapp.ui.context import UiContext
from webapp.ui.models_tab import ALL, HEADERS, ModelsTab

ADMIN = SimpleNamespace(username="admin")
ALICE = SimpleNamespace(username="alice")


def _tab(studio) -> ModelsTab:
    return ModelsTab(UiContext(users=studio.users), studio.model_services)


def test_default_imports_folder_exists_and_admins_see_the_import_roots(build_studio):
    studio = build_studio(import_roots=[])
    imports = studio.settings.data_dir / "imports"
    assert imports.is_dir()
    make_user(studio)
    tab = _tab(studio)
    shown, roots = tab.on_open(ADMIN)
    assert shown["visible"] is True and f"`{imports}`" in roots
    shown, roots = tab.on_open(ALICE)
    assert shown["visible"] is False and str(imports) not in roots and str(studio.settings.data_dir) not in roots


def test_table_has_no_hash_columns_and_the_details_panel_has_them(build_studio, tiny, tmp_path):
    folder = tmp_path / "a1111-models"
    (folder / "Lora").mkdir(parents=True)
    shutil.copy(tiny.lora, folder / "Lora" / "inplace.safetensors")
    studio = build_studio(models_dir=folder)
    studio.models.rescan_models_dir()
    make_user(studio)
    tab = _tab(studio)
    record = studio.models.list_models(actor=studio.users.get_by_name("admin"), type="lora")[0]

    assert not {"SHA256", "AutoV2", "LoRA hash", "ID"} & set(HEADERS)
    assert {"Name", "Type", "Base", "Size"} <= set(HEADERS)
    rows, *_ = tab.refresh(ALL, ALL, ALL, "", ALICE)
    assert len(rows) == 1 and len(rows[0]) == len(HEADERS)
    cells = json.dumps(rows)
    assert record.sha256 not in cells and record.autov2 not in cells and record.id not in cells

    *_, details = tab.on_select(SimpleNamespace(row_value=rows[0]), ALICE)
    assert details["sha256"] == record.sha256 and details["autov2"] == record.autov2
    assert details["lora_hash"] == record.lora_hash and details["id"] == record.id
    assert "local_path" not in details and str(folder) not in json.dumps(details)
    selected, *_, admin_details = tab.on_select(SimpleNamespace(row_value=rows[0]), ADMIN)
    assert selected["value"] == record.id
    assert admin_details["local_path"] == str(folder / "Lora" / "inplace.safetensors")
    assert tab.show(record.id, ALICE)[-1]["sha256"] == record.sha256  # choosing it in the dropdown too


def test_refresh_button_of_a_non_admin_rescans_at_most_once_per_interval(build_studio, tiny, tmp_path):
    folder = tmp_path / "a1111-models"
    (folder / "Lora").mkdir(parents=True)
    studio = build_studio(models_dir=folder)
    studio.models.rescan_models_dir()
    make_user(studio)
    tab = _tab(studio)
    shutil.copy(tiny.lora, folder / "Lora" / "first.safetensors")
    rows, *_ = tab.rescan(ALL, ALL, ALL, "", ALICE)
    assert [r[0] for r in rows] == ["first"]
    shutil.copy(tiny.lora2, folder / "Lora" / "second.safetensors")
    rows, *_ = tab.rescan(ALL, ALL, ALL, "", ALICE)
    assert [r[0] for r in rows] == ["first"], "a second rescan within the interval was skipped"
    rows, *_ = tab.rescan(ALL, ALL, ALL, "", ADMIN)
    assert [r[0] for r in rows] == ["first", "second"]


def test_a_stored_preview_that_is_a_decompression_bomb_is_not_decoded(build_studio, tiny):
    """Previews stored before uploads were checked header-first are opened the same way when shown."""
    import io

    from tests.fixtures.images import bomb_png
    from webapp.records import ModelRecord

    studio = build_studio()
    admin = studio.users.get_by_name("admin")
    record = studio.models.register_file(actor=admin, path=tiny.lora)
    studio.store.put("previews/models/old.png", io.BytesIO(bomb_png(30_000, 30_000)), content_type="image/png")
    with studio.db.write() as s:
        row = s.get(ModelRecord, record.id)
        row.preview_key = "previews/models/old.png"
        s.add(row)
    _id, name, _description, _visibility, _roles, image, details = _tab(studio).show(record.id, ADMIN)
    assert image is None and name == record.name and details["id"] == record.id
