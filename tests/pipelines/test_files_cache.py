"""PipelineCache (LRU within a byte budget, thread-safe) and device/dtype choice."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gc  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines import devices  # noqa: E402
from pipelines.cache import PipelineCache, estimate_bytes, module_bytes  # noqa: E402
from pipelines.errors import PipelineError, SkeletonNotFoundError  # noqa: E402
from pipelines.loader import load_checkpoint  # noqa: E402
from tests.tiny.fixtures import tiny_files  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def files():
    return tiny_files()


@pytest.fixture
def counting_loader(files):
    calls: list[Path] = []

    def load(path, **kwargs):
        calls.append(Path(path))
        return load_checkpoint(path, **kwargs)

    load.calls = calls
    return load


def test_module_bytes_and_estimate(files):
    pipe = files.pipeline("sd15")
    expected = sum(p.numel() * 4 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert module_bytes(pipe) >= expected
    assert abs(estimate_bytes(files.checkpoint("sd15"), torch.float32) - expected) < 0.01 * expected
    half = estimate_bytes(files.checkpoint("sd15", dtype=torch.float16, extras=True), torch.float16)
    assert abs(half - expected / 2) < 0.01 * expected  # EMA copies and fp16 storage accounted for


def test_lru_eviction_under_a_small_budget(files, counting_loader):
    sd15, sdxl = files.checkpoint("sd15"), files.checkpoint("sdxl")
    one = module_bytes(files.pipeline("sdxl"))
    cache = PipelineCache(budget_bytes=int(one * 1.5), skeleton_dirs=[files.skeleton_root], loader=counting_loader)
    first = cache.get(sd15)
    assert cache.get(sd15) is first and len(counting_loader.calls) == 1
    reference = weakref.ref(first)
    del first
    cache.get(sdxl)  # does not fit beside sd15: sd15 (least recently used) goes
    gc.collect()
    assert reference() is None, "eviction must release the pipeline"
    stats = cache.stats()
    assert [Path(e.path) for e in stats.entries] == [sdxl] and stats.evictions == 1
    assert stats.used_bytes <= stats.budget_bytes and (stats.hits, stats.misses) == (1, 2)
    cache.get(sd15)
    assert len(counting_loader.calls) == 3 and [Path(e.path) for e in cache.stats().entries] == [sd15]


def test_lru_order_follows_use(files, counting_loader):
    paths = [files.checkpoint("sd15"), files.checkpoint("sd15", fmt="ckpt"), files.checkpoint("sd15_inpaint")]
    size = module_bytes(files.pipeline("sd15_inpaint"))
    cache = PipelineCache(budget_bytes=int(size * 2.5), skeleton_dirs=[files.skeleton_root], loader=counting_loader)
    cache.get(paths[0])
    cache.get(paths[1])
    cache.get(paths[0])  # now paths[1] is the least recently used
    cache.get(paths[2])
    assert [Path(e.path) for e in cache.stats().entries] == [paths[0], paths[2]]
    assert paths[0] in cache and paths[1] not in cache


def test_room_is_made_before_loading(files):
    sizes: list[int] = []
    cache: PipelineCache

    def load(path, **kwargs):
        sizes.append(cache.stats().used_bytes)
        return load_checkpoint(path, **kwargs)

    one = module_bytes(files.pipeline("sdxl"))
    cache = PipelineCache(budget_bytes=int(one * 1.2), skeleton_dirs=[files.skeleton_root], loader=load)
    cache.get(files.checkpoint("sd15"))
    cache.get(files.checkpoint("sdxl"))
    assert sizes == [0, 0], "the old model is dropped before the new one is read, not after"


def test_same_content_shares_an_entry_by_sha256(files, counting_loader, tmp_path: Path):
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(files.checkpoint("sd15"), copy)
    cache = PipelineCache(budget_bytes=1 << 30, skeleton_dirs=[files.skeleton_root], loader=counting_loader)
    first = cache.get(files.checkpoint("sd15"), sha256="AB12")
    assert cache.get(copy, sha256="ab12") is first and len(counting_loader.calls) == 1
    assert cache.get(copy) is not first  # without a hash: identity by path


def test_concurrent_gets_load_once(files, counting_loader):
    cache = PipelineCache(budget_bytes=1 << 30, skeleton_dirs=[files.skeleton_root], loader=counting_loader)
    results: list = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(cache.get(files.checkpoint("sd15")))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r is results[0] for r in results) and len(counting_loader.calls) == 1


def test_failed_load_is_not_cached_and_reaches_every_waiter(files):
    started = threading.Event()
    release = threading.Event()

    def failing(path, **kwargs):
        started.set()
        release.wait(5)
        return load_checkpoint(path, **kwargs)  # no tiny skeletons on the path: SkeletonNotFoundError

    cache = PipelineCache(budget_bytes=1 << 30, loader=failing)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            cache.get(files.checkpoint("sd15"))
        except SkeletonNotFoundError as exc:
            errors.append(exc)

    owner = threading.Thread(target=worker)
    owner.start()
    started.wait(5)
    waiter = threading.Thread(target=worker)
    waiter.start()
    release.set()
    owner.join()
    waiter.join()
    assert len(errors) == 2 and len(cache) == 0 and cache.stats().misses == 1


def test_unload_all_and_evict(files):
    cache = PipelineCache(budget_bytes=1 << 30, skeleton_dirs=[files.skeleton_root])
    reference = weakref.ref(cache.get(files.checkpoint("sd15")))
    cache.get(files.checkpoint("sdxl"))
    assert cache.evict(files.checkpoint("sdxl")) and not cache.evict(files.checkpoint("sdxl"))
    cache.unload_all()
    gc.collect()
    assert len(cache) == 0 and reference() is None and cache.stats().used_bytes == 0
    with pytest.raises(PipelineError, match="budget_bytes must be positive"):
        PipelineCache(budget_bytes=0)


def test_device_choice_on_this_machine():
    choice = devices.choose_device()
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert choice.device == expected
    assert choice.dtype == (torch.float16 if expected != "cpu" else torch.float32)
    assert devices.choose_device("cpu", "bf16").dtype == torch.bfloat16
    assert devices.parse_dtype("fp16") == devices.parse_dtype("torch.float16") == torch.float16
    with pytest.raises(PipelineError, match="unknown dtype 'fp8'"):
        devices.parse_dtype("fp8")
    with pytest.raises(PipelineError, match="unknown device 'tpu'"):
        devices.choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="'cuda:0' was requested but is not available"):
            devices.choose_device("cuda")


def test_memory_info():
    info = devices.memory_info("cpu")
    assert 0 < info.ram_available <= info.ram_total and info.vram_total is None
    if torch.cuda.is_available():
        gpu = devices.memory_info("cuda:0")
        assert 0 < gpu.vram_free <= gpu.vram_total


def test_auto_budget_leaves_headroom_for_activations():
    from pipelines.cache import GIB, auto_budget
    from pipelines.devices import MemoryInfo

    h200 = MemoryInfo(ram_total=128 * GIB, ram_available=100 * GIB, vram_total=140 * GIB, vram_free=139 * GIB)
    assert auto_budget("cuda:0", h200) == 105 * GIB  # a quarter kept free
    card = MemoryInfo(ram_total=32 * GIB, ram_available=20 * GIB, vram_total=12 * GIB, vram_free=11 * GIB)
    assert auto_budget("cuda", card) == 8 * GIB  # at least 4 GiB kept free
    laptop = MemoryInfo(ram_total=16 * GIB, ram_available=4 * GIB)
    assert auto_budget("cpu", laptop) == 8 * GIB and auto_budget("mps", laptop) == 8 * GIB
    assert auto_budget("cpu", MemoryInfo(ram_total=GIB, ram_available=GIB)) == GIB  # never below one model
    import psutil

    assert auto_budget("cpu") == max(GIB, psutil.virtual_memory().total // 2)  # this machine, read for real
