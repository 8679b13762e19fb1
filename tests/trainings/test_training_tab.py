"""Training tab handlers, called as Gradio calls them: the form follows the base type, Format config names bad
keys, Start queues a training, the selected training shows its loss plot, samples and log, Stop / Resume /
Delete; the tab is mounted in the studio's page with every handler wrapped."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr
import pytest

from tests.trainings.conftest import dataset_of, user
from webapp.records import JobStatus
from webapp.ui.context import UiContext
from webapp.ui.localize import text_of
from webapp.ui.training_tab import HEADERS, TrainingTab

ALICE, BOB = SimpleNamespace(username="alice"), SimpleNamespace(username="bob")


def _tab(tstudio) -> TrainingTab:
    return TrainingTab(UiContext(users=tstudio.users), tstudio.trainings, tstudio.datasets)


def _until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_form_follows_the_base_type_and_format_config_names_bad_keys(tstudio):
    alice = user(tstudio, "alice")
    dataset = dataset_of(tstudio, alice)
    tab = _tab(tstudio)
    rows, trainings, datasets, checkpoints, endpoints = tab.refresh_training_form("sd15", ALICE)
    assert [value for _, value in endpoints["choices"]] == ["trainers"]  # the fake local endpoint cannot train
    assert rows == [] and dataset.id in [value for _, value in datasets["choices"]]
    assert [label for label, _ in checkpoints["choices"]][0].startswith("tiny-sd15")
    models, text = tab.training_base_changed("sdxl", ALICE)
    assert models["choices"] == [] and "resolution = 1024" in text and "clip_skip" not in text
    formatted, message = tab.format_training_config("network_dim = 8\nxformers = true", "sd15")
    assert "network_dim = 8" in formatted and "resolution = 512" in formatted
    assert "Config is valid" in message and "xformers: ignored" in message
    with pytest.raises(gr.Error, match="netwrk_dim: unknown key"):
        tab.format_training_config("netwrk_dim = 8", "sd15")
    with pytest.raises(gr.Error, match="Choose a sd15 checkpoint"):
        tab.create_training("sd15", None, dataset.id, "", "x", None, ALICE)


def test_start_follow_stop_resume_and_delete_a_training(tstudio):
    alice = user(tstudio, "alice")
    user(tstudio, "bob")
    dataset = dataset_of(tstudio, alice)
    tab = _tab(tstudio)
    checkpoint = tstudio.models.checkpoint.id
    with pytest.raises(gr.Error, match="network_dim"):
        tab.create_training("sd15", checkpoint, dataset.id, "network_dim = -1", "tablora", None, ALICE)
    tstudio.trainer.hold = True
    tstudio.dispatcher.resume()
    message, rows, selected = tab.create_training("sd15", checkpoint, dataset.id, "network_dim = 4", "tablora",
                                                  None, ALICE)
    job_id = selected["value"]
    assert "Queued training **tablora**" in message and rows[0][HEADERS.index("Output")] == "tablora"
    assert tstudio.trainer.saved.wait(20)
    _until(lambda: tstudio.trainings.get(actor=alice, job_id=job_id).metrics.get("history"))
    summary, plot, samples, log_tail, timer, shown = tab.show_training(job_id, [], ALICE)
    assert "tablora" in summary and "running" in summary
    assert list(plot["loss"]) == [0.9, 0.5] and list(plot["step"]) == [1, 2]
    assert [label for _, label in samples] == ["tablora-e000001-00.png"]
    assert log_tail.splitlines()[0] == "step 1 loss 0.9"  # the row's log is written about once a second
    assert timer.active is True
    assert tab.show_training(job_id, shown, ALICE)[2] == gr.skip()  # polled again: the same samples are not resent
    with pytest.raises(gr.Error, match="no job"):
        tab.show_training(job_id, [], BOB)
    tab.stop_training(job_id, ALICE)
    _until(lambda: tstudio.trainings.get(actor=alice, job_id=job_id).status == JobStatus.CANCELLED)
    summary, *_, timer, _ = tab.show_training(job_id, shown, ALICE)
    assert "Resume" in summary and timer.active is False
    tstudio.trainer.hold = False
    rows, selected = tab.resume_training(job_id, ALICE)
    assert selected["value"] != job_id and len(rows) == 2
    rows, selected = tab.delete_training(job_id, ALICE)
    assert len(rows) == 1 and selected["value"] is None


def test_the_tab_is_mounted_in_the_page(tstudio):
    blocks = next(r.app.get_blocks() for r in tstudio.app.routes if getattr(r, "path", "") == "/ui")
    names = {getattr(dep.fn, "__name__", "") for dep in blocks.fns.values() if dep.fn is not None}
    assert {"create_training", "show_training", "format_training_config", "stop_training", "resume_training",
            "delete_training", "refresh_training_form"} <= names
    labels = {text_of(getattr(block, "label", None)) for block in blocks.blocks.values()}  # the page holds i18n keys
    assert "Training" in labels and "Config (TOML, kohya keys)" in labels
