"""hf:// sources resolved through huggingface_hub's real cache with HF_HUB_OFFLINE=1.

The cache layout is built on disk (blobs, snapshots/<commit>, refs/main and refs/v2); nothing
touches the network (offline mode makes huggingface_hub refuse any request).
"""

from __future__ import annotations

import json

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.cli import main
from lorakit.errors import (
    GatedRepoAccessError,
    HubNotFoundError,
    HubOfflineError,
    InputNotFoundError,
    OptionError,
)
from lorakit.formats import save_adapter
from lorakit.hub import HubSource, parse, pick_files, resolve

from ._cache import add_snapshot, folder_bytes

MAIN = "a" * 40
V2 = "b" * 40


def make_adapter(rank: int, seed: int, base: str = "gpt2") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {f"transformer.h.{i}.attn.c_attn": LoraModule(
        down=torch.randn(rank, 16, generator=g),  # A (r, in)
        up=torch.randn(48, rank, generator=g),  # B (out, r)
        alpha=2.0 * rank) for i in range(2)}
    return Adapter(modules=mods, base_model=base)


def delta_of(a: Adapter) -> dict[str, torch.Tensor]:
    return {k: m.delta() for k, m in a.modules.items()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF cache holding org/lora at main (PEFT, rank 4) and v2 (PEFT rank 8 at the
    root, a kohya file under kohya/, a PEFT adapter under unet/, docs without adapters)."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    build = tmp_path / "build"
    adapters = {"main": make_adapter(4, 0), "v2": make_adapter(8, 1), "unet": make_adapter(2, 2),
                "kohya": make_adapter(3, 3)}
    save_adapter(adapters["main"], build / "main", "peft")
    save_adapter(adapters["v2"], build / "v2", "peft")
    save_adapter(adapters["unet"], build / "unet", "peft")
    save_adapter(adapters["kohya"], build / "k.safetensors", "kohya")
    add_snapshot(cache, "org/lora", MAIN, folder_bytes(build / "main"), refs=("main",))
    files = {**folder_bytes(build / "v2"), **folder_bytes(build / "unet", "unet/"),
             "kohya/lora_v2.safetensors": (build / "k.safetensors").read_bytes(),
             "docs/notes.md": b"# notes\n"}
    add_snapshot(cache, "org/lora", V2, files, refs=("v2",))
    return adapters


def assert_same(a: Adapter, b: Adapter) -> None:
    da, db = delta_of(a), delta_of(b)
    assert set(da) == set(db)
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=1e-6, atol=1e-6)


def test_parse_forms():
    assert parse("hf://org/repo") == HubSource("org/repo", None, "")
    assert parse("hf://org/repo@v2") == HubSource("org/repo", "v2", "")
    assert parse("hf://org/repo@v2/unet/") == HubSource("org/repo", "v2", "unet")
    assert parse("hf://org/repo/a/b.safetensors").name == "repo--a--b"
    assert str(parse("hf://org/repo@refs%2Fpr%2F1/x")) == "hf://org/repo@refs%2Fpr%2F1/x"
    for bad in ("hf://repo", "hf://org/re po", "hf://org/repo/../x"):
        with pytest.raises(OptionError):
            parse(bad)


def test_pull_main_revision_and_commit(hub_cache):
    local = resolve("hf://org/lora")
    assert local.name == MAIN and (local / "adapter_config.json").is_file()
    assert_same(lorakit.load("hf://org/lora"), hub_cache["main"])
    a = lorakit.load("hf://org/lora@v2")
    assert set(a.ranks().values()) == {8}
    assert_same(a, hub_cache["v2"])
    assert_same(lorakit.load(f"hf://org/lora@{V2}"), hub_cache["v2"])  # a commit hash
    assert a.source == "hf://org/lora@v2"


def test_pull_subfolder_and_file(hub_cache):
    unet = lorakit.load("hf://org/lora@v2/unet")
    assert unet.source_format == "peft"
    assert_same(unet, hub_cache["unet"])
    # a folder holding one kohya file resolves to that file; naming the file works too
    for src in ("hf://org/lora@v2/kohya", "hf://org/lora@v2/kohya/lora_v2.safetensors"):
        path = resolve(src)
        assert path.name == "lora_v2.safetensors"
        k = lorakit.load(src)
        assert k.source_format == "kohya"
        assert_same(k, hub_cache["kohya"])


def test_pull_errors(hub_cache):
    with pytest.raises(HubOfflineError, match=r"hf://org/missing: HF_HUB_OFFLINE is set"):
        resolve("hf://org/missing")
    with pytest.raises(HubOfflineError, match="not in the local"):
        resolve("hf://org/lora@v3")  # a revision that was never cached
    with pytest.raises(InputNotFoundError, match=r"hf://org/lora@v2/docs: no adapter files"):
        resolve("hf://org/lora@v2/docs")
    with pytest.raises(HubNotFoundError, match="no path 'nope'"):
        resolve("hf://org/lora@v2/nope")
    with pytest.raises(InputNotFoundError, match="adapters may be in a subfolder: kohya, unet"):
        pick_files(["docs/notes.md", "kohya/a.safetensors", "unet/adapter_config.json",
                    "unet/adapter_model.safetensors"], HubSource("org/lora"))
    with pytest.raises(InputNotFoundError, match="several weights files"):
        pick_files(["a.safetensors", "b.safetensors"], HubSource("org/lora"))


def _gated(*_a, **_k):
    resp = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/api/x"))
    raise hf_errors.GatedRepoError("403 gated", response=resp)


def _missing(*_a, **_k):
    resp = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/x"))
    raise hf_errors.RepositoryNotFoundError("404", response=resp)


@pytest.mark.parametrize(("fake", "error", "text"), [
    (_gated, GatedRepoAccessError, "gated"),
    (_missing, HubNotFoundError, "repository not found"),
])
def test_online_errors_are_named(monkeypatch, tmp_path, fake, error, text):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake)
    with pytest.raises(error, match=text) as info:
        resolve("hf://org/gated-lora")
    assert info.value.path == "hf://org/gated-lora"


def test_unreachable_hub_falls_back_to_the_cache(monkeypatch, hub_cache):
    """Online mode, but the listing cannot connect: the cached snapshot is used, no download."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*_a, **_k):
        raise httpx2.ConnectError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    real = huggingface_hub.hf_hub_download
    modes = []

    def download(repo_id, filename, revision=None, local_files_only=False):
        modes.append(local_files_only)
        return real(repo_id, filename, revision=revision, local_files_only=True)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert_same(lorakit.load("hf://org/lora@v2/unet"), hub_cache["unet"])
    assert modes == [True, True]
    with pytest.raises(HubOfflineError, match="cannot reach the Hub and the repository is not"):
        resolve("hf://org/elsewhere")


def test_online_fetches_only_the_adapter_files(monkeypatch, hub_cache):
    """With a listing that holds other large files, only the config and weights are fetched."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = ["README.md", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin", "optimizer.pt", "checkpoint-500/adapter_model.safetensors"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo_id, revision=None: listing)
    fetched = []
    real = huggingface_hub.hf_hub_download

    def download(repo_id, filename, revision=None, local_files_only=False):
        fetched.append(filename)  # served from the cache built above, never the network
        return real(repo_id, filename, revision=revision, local_files_only=True)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert_same(lorakit.load("hf://org/lora"), hub_cache["main"])
    assert fetched == ["adapter_config.json", "adapter_model.safetensors"]


def test_cli_reads_hf_sources(hub_cache, tmp_path, capsys):
    main(["inspect", "hf://org/lora@v2/unet", "--json", "--no-spectra"])
    info = json.loads(capsys.readouterr().out)
    assert (info["source"], info["format"], info["ranks"]) == ("hf://org/lora@v2/unet", "peft", [2])
    out = tmp_path / "small"
    main(["resize", "hf://org/lora@v2", "-o", str(out), "--rank", "2", "--quiet"])
    small = lorakit.load(out)
    assert set(small.ranks().values()) == {2}
    card = (out / "README.md").read_text()
    assert "source: `hf://org/lora@v2`" in card
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "hf://org/absent"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lorakit: error: hf://org/absent: HF_HUB")
