"""The backend contract: messages survive JSON, the registry builds by kind, the fake keeps the contract."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import threading
import time

import pytest

from deploy.backends import registry
from deploy.backends.base import Backend, BackendBusy, BackendError
from deploy.backends.fake import FakeBackend
from deploy.backends.local import detect_devices, parse_devices
from deploy.backends.messages import (
    Cancelled,
    Failed,
    JobModels,
    JobSpec,
    MessageError,
    ModelSpec,
    Progress,
    Started,
    Succeeded,
    event_from_json,
)
from deploy.model_files import ModelFileRef
from pipelines.types import GenerationRequest

SHA = "ab" * 32


def _spec(job_id: str = "job1", **request) -> JobSpec:
    ref = ModelFileRef(sha256=SHA, store_key="models/checkpoint/x.safetensors", local_path=None, size=10)
    lora = ModelSpec(kind="lora", name="detail", sha256="cd" * 32,
                     file=ModelFileRef(sha256="cd" * 32, store_key=None, local_path="/models/detail.safetensors",
                                       size=5), lora_hash="ef" * 32)
    models = JobModels(checkpoint=ModelSpec(kind="checkpoint", name="tiny", sha256=SHA, file=ref),
                       vae="None", loras={"detail": lora})
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 1, **request}
    return JobSpec(job_id=job_id, mode="txt2img", request=GenerationRequest(**body), models=models, attempt=2)


EVENTS = [
    Started(job_id="j", worker="local/cuda:0"),
    Progress(job_id="j", step=3, total=10, job_no=1, job_count=2, eta=4.5, preview_png="iVBORw0KGgo=", phase="hires"),
    Progress(job_id="j", step=1, total=10),
    Succeeded(job_id="j", images=(b"\x89PNG one", b"\x89PNG two"), infotexts=("a", "b"), seeds=(1, 2),
              warnings=("w",), timings={"total": 1.5}, info={"seed": 1, "all_seeds": [1, 2]}),
    Succeeded(job_id="j", image_keys=("jobs/j/0.png",), infotexts=("a",), seeds=(5,)),
    Failed(job_id="j", message="out of GPU memory", kind="oom"),
    Failed(job_id="j", message="`steps` must be ...", kind="bad_request", field="steps"),
    Cancelled(job_id="j", reason="cancelled while running"),
    Cancelled(job_id="j", reason="cancelled while running", images=(b"\x89PNG kept",), infotexts=("a",), seeds=(7,)),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.type}")
def test_every_event_round_trips_through_json(event):
    text = event.to_json()
    json.loads(text)  # plain JSON, no Python objects
    again = event_from_json(text)
    assert again == event
    assert type(again).from_json(text) == event


def test_job_spec_round_trips_through_json():
    spec = _spec()
    again = JobSpec.from_json(spec.to_json())
    assert again == spec
    assert again.models.loras["detail"].file.local_path == "/models/detail.safetensors"
    assert [m.name for m in again.models.all_specs()] == ["tiny", "detail"]


def test_controlnet_models_round_trip_in_unit_order():
    def controlnet(name: str, sha: str) -> ModelSpec:
        return ModelSpec(kind="controlnet", name=name, sha256=sha,
                         file=ModelFileRef(sha256=sha, store_key=f"models/controlnet/{name}", local_path=None, size=3))

    base = _spec()
    spec = dataclasses.replace(base, models=dataclasses.replace(
        base.models, controlnets=(controlnet("pose", "11" * 32), controlnet("canny", "22" * 32))))
    again = JobSpec.from_json(spec.to_json())
    assert again == spec
    assert [m.name for m in again.models.controlnets] == ["pose", "canny"]
    assert [m.name for m in again.models.all_specs()][-2:] == ["pose", "canny"]


def test_bad_messages_are_refused_with_a_reason():
    with pytest.raises(MessageError, match="unknown event type"):
        event_from_json('{"type": "exploded", "job_id": "j"}')
    with pytest.raises(MessageError, match="failure kind"):
        Failed(job_id="j", message="x", kind="sad")
    with pytest.raises(MessageError, match="expected a 'progress' event"):
        Progress.from_json(Started(job_id="j").to_json())
    with pytest.raises(MessageError, match="not a job spec"):
        JobSpec.from_dict({"job_id": "j"})


def test_progress_fraction_counts_passes():
    assert Progress(job_id="j", step=5, total=10, job_no=1, job_count=2).fraction == pytest.approx(0.75)
    assert Progress(job_id="j", step=0, total=0).fraction == 0.0


def test_registry_builds_by_kind_and_names_the_choices():
    assert {"local", "fake"} <= set(registry.backend_kinds())
    backend = registry.create_backend(registry.BackendConfig(name="e", kind="fake", options={"slots": 2}))
    assert isinstance(backend, Backend) and backend.kind == "fake" and backend.capabilities().slots == 2
    with pytest.raises(BackendError, match="unknown backend kind 'sagemaker-x'.*fake"):
        registry.create_backend(registry.BackendConfig(name="e", kind="sagemaker-x"))
    with pytest.raises(ValueError, match="fake option `slot`: Extra inputs"):
        registry.create_backend(registry.BackendConfig(name="e", kind="fake", options={"slot": 2}))
    with pytest.raises(BackendError, match="already registered"):
        registry.register_backend("fake", lambda config: None)


def test_importing_the_backend_layer_does_not_import_torch_or_webapp():
    import subprocess

    code = ("import sys; import deploy.backends.registry, deploy.backends.local, deploy.backends.fake, "
            "deploy.backends.http; print('torch' in sys.modules, any(m.startswith('webapp') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


class Sink:
    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Succeeded | Failed | Cancelled):
            self.done.set()

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]


def test_fake_backend_runs_a_job_with_progress_and_a_real_png():
    from PIL import Image

    backend, sink = FakeBackend("f", slots=1, preview_every=2), Sink()
    backend.start(sink)
    try:
        assert backend.free_slots() == 1
        backend.submit(_spec(n_iter=2, batch_size=2))
        assert backend.free_slots() == 0
        with pytest.raises(BackendBusy):
            backend.submit(_spec("job2"))
        assert sink.done.wait(10)
    finally:
        backend.stop()
    done = sink.of(Succeeded)[0]
    assert isinstance(sink.events[0], Started)
    steps = [(p.job_no, p.step) for p in sink.of(Progress)]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert [p.preview_png is not None for p in sink.of(Progress)][:3] == [False, True, False]
    assert len(done.images) == 4 and done.seeds == (1, 2, 3, 4)
    with Image.open(io.BytesIO(done.images[1])) as image:
        assert image.size == (64, 64)
        assert image.info["parameters"] == done.infotexts[1] and "Seed: 2" in done.infotexts[1]


def test_fake_backend_cancel_stops_within_one_step_and_frees_the_slot():
    backend, sink = FakeBackend("f", step_delay=0.02), Sink()
    backend.start(sink)
    try:
        backend.submit(_spec(steps=500))
        while not sink.of(Progress):
            time.sleep(0.01)
        assert backend.cancel("job1") is True
        assert backend.cancel("not-mine") is False
        assert sink.done.wait(5)
        assert backend.free_slots() == 1
    finally:
        backend.stop()
    assert isinstance(sink.events[-1], Cancelled)
    assert max(p.step for p in sink.of(Progress)) < 20


def test_fake_backend_stop_reports_interrupted_so_the_queue_can_retry():
    backend, sink = FakeBackend("f", step_delay=0.02), Sink()
    backend.start(sink)
    backend.submit(_spec(steps=500))
    while not sink.of(Progress):
        time.sleep(0.01)
    backend.stop()
    assert sink.done.wait(5)
    assert sink.events[-1] == Failed(job_id="job1", message="the backend stopped while the job was running",
                                     kind="interrupted")
    assert backend.free_slots() == 0


def test_local_device_detection_without_torch(tmp_path):
    no_dev = tmp_path / "no-dev"
    assert detect_devices({}, tmp_path / "missing", no_dev) == ["cpu"]
    proc = tmp_path / "proc"
    for i in range(2):
        (proc / f"0000:0{i}:00.0").mkdir(parents=True)
    assert detect_devices({}, proc, no_dev) == ["cuda:0", "cuda:1"]
    assert detect_devices({"CUDA_VISIBLE_DEVICES": "1"}, proc, no_dev) == ["cuda:0"]
    assert detect_devices({"CUDA_VISIBLE_DEVICES": ""}, proc, no_dev) == ["cpu"]
    # a container with the device nodes but no driver /proc entries
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm", "null"):
        (dev / name).touch()
    assert detect_devices({}, tmp_path / "missing", dev) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("auto") is None and parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="tpu"):
        parse_devices("tpu:0")


def test_a_spec_from_the_wire_is_validated_naming_the_field():
    from pipelines.types import InvalidRequestError

    wire = _spec().to_dict()
    with pytest.raises(InvalidRequestError) as bad_steps:
        JobSpec.from_dict({**wire, "request": {**wire["request"], "steps": 0}})
    assert bad_steps.value.field == "steps"
    unit = {"model": "cn", "module": "none", "image": "bm90IGFuIGltYWdl", "arg_index": 2}  # "not an image"
    with pytest.raises(InvalidRequestError) as bad_unit:
        JobSpec.from_dict({**wire, "controlnet_units": [unit]})
    assert bad_unit.value.field == "alwayson_scripts.controlnet.args[2].image", "named where the client put it"
