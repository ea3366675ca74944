"""Push: HfApi patched at lorakit's call site; assert repo, files, revision and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants

from lorakit.cli import main
from lorakit.errors import HubOfflineError, InputNotFoundError, OptionError
from lorakit.hub import card_front_matter, push
from tests.conftest import real_adapter

SECRET = "hf_SECRETtokenNEVERprinted0123456789"


class FakeApi:
    """Records what lorakit asks of HfApi; the token is whatever huggingface_hub would use."""

    calls: list = []
    commits: list = []

    def __init__(self, *args, **kwargs):
        FakeApi.calls.append(("init", args, kwargs))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, *, branch, exist_ok=False):
        FakeApi.calls.append(("create_branch", repo_id, branch, exist_ok))

    def create_commit(self, repo_id, operations, *, commit_message, revision=None):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        FakeApi.commits.append({"repo_id": repo_id, "revision": revision, "files": files,
                                "message": commit_message})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123")


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls, FakeApi.commits = [], []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return FakeApi


def test_push_to_after_resize(fake_hub, tmp_path, capsys):
    src = real_adapter("gpt2_r4_jhess")
    out = tmp_path / "gpt2_r2"
    main(["resize", str(src), "-o", str(out), "--rank", "2", "--quiet",
          "--push-to", "me/gpt2-r2", "--revision", "v1", "--private"])
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "pushed 3 files" in captured.err and "me/gpt2-r2@v1" in captured.err
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["init", "create_repo", "create_branch"]
    assert fake_hub.calls[1][1] == "me/gpt2-r2" and fake_hub.calls[1][2]["private"] is True
    assert fake_hub.calls[2][1:] == ("me/gpt2-r2", "v1", True)
    (commit,) = fake_hub.commits
    assert commit["repo_id"] == "me/gpt2-r2" and commit["revision"] == "v1"
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json",
                                       "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert commit["files"][name] == (out / name).read_bytes()
    front, body = card_front_matter(commit["files"]["README.md"].decode())
    assert front["base_model"] == "gpt2" and front["library_name"] == "peft"
    assert {"lora", "lorakit", "peft"} <= set(front["tags"])
    assert "lorakit resize" in body and "--rank 2" in body
    assert f"source: `{src}`" in body


def test_push_command_kohya_file(fake_hub, tmp_path, capsys):
    src = real_adapter("sd15_kohyalike_timohavdk") / "new.safetensors"
    out = tmp_path / "lora.safetensors"
    main(["convert", str(src), "--to", "kohya", "-o", str(out), "--quiet"])
    main(["push", str(out), "me/sd-lora", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [f["path"] for f in result["files"]] == ["lora.safetensors", "README.md"]
    (commit,) = fake_hub.commits
    assert commit["revision"] is None
    assert commit["files"]["lora.safetensors"] == out.read_bytes()
    front, body = card_front_matter(commit["files"]["README.md"].decode())
    assert "library_name" not in front  # not PEFT output
    assert {"lora", "lorakit", "kohya"} <= set(front["tags"])
    assert "lorakit convert" in body and f"source: `{src}`" in body  # from the file's metadata


def test_dry_run_uploads_nothing(fake_hub, tmp_path, capsys):
    out = tmp_path / "conv"
    main(["convert", str(real_adapter("gpt2_phuongsky")), "--to", "peft", "-o", str(out),
          "--quiet", "--push-to", "me/x", "--dry-run"])
    err = capsys.readouterr().err
    assert "dry run: would upload 3 files" in err
    assert "adapter_model.safetensors" in err and "README.md" in err
    assert fake_hub.calls == [] and fake_hub.commits == []
    main(["push", str(out), "me/x", "--dry-run"])
    assert "adapter_config.json" in capsys.readouterr().out
    assert fake_hub.calls == []
    with pytest.raises(SystemExit) as info:  # push flags without --push-to: refused up front
        main(["convert", str(real_adapter("gpt2_phuongsky")), "--to", "peft", "-o",
              str(tmp_path / "never"), "--dry-run"])
    assert info.value.code == 2 and not (tmp_path / "never").exists()
    assert "only apply with --push-to" in capsys.readouterr().err


def test_push_collection_and_custom_card(fake_hub, tmp_path, capsys):
    coll = tmp_path / "coll"
    main(["resize", str(real_adapter("gpt2_phuongsky")), str(real_adapter("gpt2_anirudh")),
          "-o", str(coll), "--rank", "2", "--quiet", "--push-to", "me/coll"])
    assert (coll / ".lorakit-batch").is_dir()  # batch records stay local
    assert "pushed 7 files" in capsys.readouterr().err
    card = FakeApi.commits[0]["files"]["README.md"].decode()
    files = sorted(FakeApi.commits[0]["files"])
    assert files == ["README.md", *[f"{n}/{f}" for n in ("gpt2_anirudh", "gpt2_phuongsky")
                                    for f in ("README.md", "adapter_config.json",
                                              "adapter_model.safetensors")]]
    assert "`gpt2_anirudh` | peft | 12 | [2]" in card
    assert "- command: `lorakit resize" in card and "--push-to me/coll" in card  # as given
    assert card_front_matter(card)[0]["library_name"] == "peft"
    push(coll / "gpt2_anirudh", "me/one", card="---\nlicense: mit\n---\nmine\n")
    assert FakeApi.commits[1]["files"]["README.md"] == b"---\nlicense: mit\n---\nmine\n"


def test_push_errors(fake_hub, tmp_path, monkeypatch):
    with pytest.raises(InputNotFoundError):
        push(tmp_path / "absent", "me/x")
    with pytest.raises(OptionError, match="ORG/REPO"):
        push(real_adapter("gpt2_phuongsky"), "noslash")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        push(real_adapter("gpt2_phuongsky"), "me/x")
    assert push(real_adapter("gpt2_phuongsky"), "me/x", dry_run=True).dry_run
    assert fake_hub.commits == []
