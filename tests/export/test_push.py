"""`t2r export --push-to-hub`, tested at the huggingface_hub boundary (the Hub is unreachable here):
HfApi.create_repo / upload_folder are replaced by recorders."""
import json
import logging
import os
import re
import shlex
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForCausalLM

from t2r.cli import main
from tests.export.fixtures import IDS, make_run

TOKEN = "hf_SENTINELtoken0123456789abcdefXYZ"


class FakeHub:
    """Records create_repo / create_branch / upload_folder calls and keeps each branch's files, applying an
    upload as the Hub does: ``delete_patterns`` (matched by huggingface_hub's own filter) remove the remote
    files the upload lacks, never .gitattributes. ``fail`` makes uploads raise (with the token in the text,
    as a careless HTTP error might)."""

    def __init__(self, monkeypatch, fail=False):
        self.calls, self.fail, self.uploaded_files = [], fail, []
        self.remote: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, branch) -> path -> content
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw))
            hub.remote.setdefault((repo_id, "main"), {".gitattributes": b"*.safetensors filter=lfs"})
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, *, branch, **kw):
            hub.calls.append(("create_branch", repo_id, {"branch": branch, **kw}))
            hub.remote.setdefault((repo_id, branch), dict(hub.remote[(repo_id, "main")]))

        def upload_folder(api, *, repo_id, folder_path, revision=None, delete_patterns=None, **kw):
            hub.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, "revision": revision,
                                                         "delete_patterns": delete_patterns, **kw}))
            if hub.fail:
                raise OSError(f"503 Service Unavailable (request had Authorization: Bearer {TOKEN})")
            root = Path(folder_path)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
            hub.uploaded_files = sorted(p.name for p in root.iterdir())
            state = hub.remote[(repo_id, revision or "main")]
            for stale in filter_repo_objects(list(state), allow_patterns=delete_patterns) if delete_patterns else []:
                if stale != ".gitattributes" and stale not in files:
                    del state[stale]
            state.update(files)
            return "commit"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    root, reference, _ = make_run(tmp_path / "run", lora=True)
    return root, reference


def _token_nowhere(texts, folder):
    for text in texts:
        assert TOKEN not in text
    for f in folder.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_push_creates_the_repo_and_uploads_the_finished_export(run, tmp_path, monkeypatch, capsys, caplog):
    root, _ = run
    hub = FakeHub(monkeypatch)
    out = tmp_path / "export"
    with caplog.at_level(logging.DEBUG):
        assert main(["export", str(root), "--out", str(out), "--push-to-hub", "my-org/tiny-gsa", "--private"]) == 0
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    (_, repo, create), (_, repo2, upload) = hub.calls
    assert repo == repo2 == "my-org/tiny-gsa" and create["private"] is True and create["exist_ok"] is True
    assert upload["folder_path"] == str(out) and create.get("repo_type", "model") == "model"
    assert {"config.json", "model.safetensors", "README.md", "modeling_t2r.py", "t2r_export.json"} <= set(
        hub.uploaded_files)  # uploaded once complete, from its final place
    assert 'from_pretrained("my-org/tiny-gsa", trust_remote_code=True)' in (out / "README.md").read_text()
    captured = capsys.readouterr()
    assert "pushed to https://huggingface.co/my-org/tiny-gsa" in captured.out
    _token_nowhere([captured.out, captured.err, caplog.text], out)


def test_failed_upload_keeps_the_export_and_prints_the_retry_command(run, tmp_path, monkeypatch, capsys, caplog):
    root, reference = run
    hub = FakeHub(monkeypatch, fail=True)
    out = tmp_path / "export"
    with caplog.at_level(logging.DEBUG):
        code = main(["export", str(root), "--out", str(out), "--push-to-hub", "my-org/tiny-gsa", "--private"])
    assert code == 2
    err = capsys.readouterr().err
    assert "uploading to my-org/tiny-gsa failed (OSError: 503 Service Unavailable" in err
    retry = f"t2r export {out.resolve()} --push-to-hub my-org/tiny-gsa --private"
    assert f"retry the upload with:\n  {retry}" in err
    _token_nowhere([err, caplog.text], out)
    with torch.no_grad():  # the local export is complete and usable
        assert AutoModelForCausalLM.from_pretrained(out)(IDS).logits.shape == reference.shape

    hub.fail, hub.calls = False, []  # the printed command uploads the same folder, without exporting again
    argv = shlex.split(retry)
    assert argv[0] == "t2r" and main(argv[1:]) == 0
    assert [(c[0], c[1]) for c in hub.calls] == [("create_repo", "my-org/tiny-gsa"), ("upload_folder", "my-org/tiny-gsa")]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["folder_path"] == str(out.resolve())


def test_pushing_an_export_whose_files_changed_is_refused(run, tmp_path, monkeypatch, capsys):
    root, _ = run
    hub = FakeHub(monkeypatch)
    out = tmp_path / "export"
    assert main(["export", str(root), "--out", str(out)]) == 0
    (out / "modeling_t2r.py").unlink()
    assert main(["export", str(out), "--push-to-hub", "my-org/tiny-gsa"]) == 2
    assert f"{out / 'modeling_t2r.py'} is missing since the export" in capsys.readouterr().err
    assert hub.calls == []


def test_without_a_token_nothing_is_exported_or_uploaded(tmp_path, monkeypatch, capsys):
    root, _, _ = make_run(tmp_path / "run", lora=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    hub = FakeHub(monkeypatch)
    assert main(["export", str(root), "--out", str(tmp_path / "e"), "--push-to-hub", "my-org/x"]) == 2
    assert "set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "e").exists()


def test_bad_repo_ids_and_flag_combinations_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    root, _, _ = make_run(tmp_path / "run", lora=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cases = [(["--out", "e", "--push-to-hub", "a/b/c"], "is not a Hub repo id"),
             (["--out", "e", "--private"], "--private applies to --push-to-hub"),
             (["--push-to-hub", "my-org/x"], "--out is required"),
             (["--out", "e", "--base-id", "o/b"], "add --adapter-only"),
             (["--out", "e", "--max-shard-size", "5 gigs"], "--max-shard-size '5 gigs' is not a size"),
             (["--out", "e", "--push-to-hub", "my-org/x", "--revision", "a..b"], "--revision 'a..b' is not a branch"),
             (["--out", "e", "--revision", "v2"], "--revision and --commit-message apply to --push-to-hub")]
    for args, message in cases:
        assert main(["export", str(root), *[str(tmp_path / a) if a == "e" else a for a in args]]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


ABSOLUTE = re.compile(r"(?<![\w.:/-])/[\w.+-]+/")  # /dir/... in prose, not inside a URL


def _no_local_path(files: dict[str, bytes], *local: Path):
    """No uploaded text file names a local folder; the card and the JSON metadata name no absolute path."""
    for name, data in files.items():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # weights
        for folder in local:
            assert str(folder) not in text, (name, folder)
        if name == "README.md":
            assert not ABSOLUTE.search(text), ABSOLUTE.search(text)
        if name.endswith(".json") and name != "tokenizer.json":
            strings = re.findall(r'"((?:[^"\\]|\\.)*)"', text)
            assert not [v for v in strings if v.startswith(("/", "~"))], name


def test_a_pushed_card_and_config_name_no_local_path(tmp_path, monkeypatch):
    """A teacher from a local folder, exported under tmp_path without --push-to-hub (so the card names the
    folder), then pushed as it is: the repo names the Hub repo and the teacher's folder name only."""
    from t2r.tiny import tiny_teacher

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    teacher, tok = tiny_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    assert main(["convert", str(tmp_path / "teacher"), "--out", str(tmp_path / "conv"), "--num-slots", "8"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "conv"), "--out", str(out)]) == 0
    assert f'from_pretrained("{out.resolve()}"' in (out / "README.md").read_text()  # for use where it is

    hub = FakeHub(monkeypatch)
    assert main(["export", str(out), "--push-to-hub", "my-org/tiny-gsa"]) == 0
    files = hub.remote[("my-org/tiny-gsa", "main")]
    card = files["README.md"].decode()
    assert card.splitlines()[card.splitlines().index("# tiny-gsa") - 1] == ""
    assert 'from_pretrained("my-org/tiny-gsa", trust_remote_code=True)' in card
    assert "`t2r generate my-org/tiny-gsa --prompt" in card and "`teacher`" in card
    assert json.loads(files["config.json"])["base_model_name_or_path"] == "teacher"
    _no_local_path(files, tmp_path, tmp_path.resolve(), Path.home(), Path(os.getcwd()))
    assert (out / "README.md").read_bytes() == files["README.md"]  # the local export is what the repo holds
    assert main(["export", str(out), "--push-to-hub", "my-org/tiny-gsa"]) == 0  # and still verifies

    assert main(["export", str(tmp_path / "conv"), "--out", str(tmp_path / "e2"), "--push-to-hub", "my-org/b"]) == 0
    _no_local_path(hub.remote[("my-org/b", "main")], tmp_path, tmp_path.resolve(), Path.home(), Path(os.getcwd()))


def test_a_push_to_a_branch_with_a_message_replaces_what_an_earlier_push_left(run, tmp_path, monkeypatch, capsys):
    root, _ = run
    hub = FakeHub(monkeypatch)
    repo = "my-org/tiny-gsa"
    hub.remote[(repo, "main")] = {".gitattributes": b"*.safetensors filter=lfs", "notes/plot.png": b"PNG"}

    # an adapter must name its base on the Hub: a local path would be pushed otherwise
    assert main(["export", str(root), "--out", str(tmp_path / "a0"), "--adapter-only", "--push-to-hub", repo]) == 2
    assert "--push-to-hub of an adapter needs --base-id ORG/BASE" in capsys.readouterr().err
    assert not (tmp_path / "a0").exists() and hub.calls == []

    assert main(["export", str(root), "--out", str(tmp_path / "a"), "--adapter-only", "--base-id", "my-org/base",
                 "--push-to-hub", repo, "--commit-message", "adapter, first try"]) == 0
    assert "adapter_model.safetensors" in hub.remote[(repo, "main")]
    assert main(["export", str(root), "--out", str(tmp_path / "m"), "--push-to-hub", repo,
                 "--commit-message", "merged model"]) == 0
    main_files = hub.remote[(repo, "main")]
    assert "model.safetensors" in main_files and "modeling_t2r.py" in main_files
    assert not {"adapter_model.safetensors", "adapter_config.json"} & set(main_files)  # stale: removed
    assert {".gitattributes", "notes/plot.png"} <= set(main_files)  # not t2r's kinds of files: kept
    uploads = [c[2] for c in hub.calls if c[0] == "upload_folder"]
    assert [u["commit_message"] for u in uploads] == ["adapter, first try", "merged model"]
    assert all(u["revision"] is None for u in uploads)

    hub.calls = []
    before = dict(main_files)
    assert main(["export", str(tmp_path / "m"), "--push-to-hub", repo, "--revision", "v2",
                 "--commit-message", "v2 weights"]) == 0
    assert [(c[0], c[2].get("branch") or c[2].get("revision")) for c in hub.calls[1:]] == [
        ("create_branch", "v2"), ("upload_folder", "v2")]
    assert hub.calls[-1][2]["commit_message"] == "v2 weights"
    assert hub.remote[(repo, "main")] == before and "model.safetensors" in hub.remote[(repo, "v2")]
    assert "pushed to https://huggingface.co/my-org/tiny-gsa (branch v2)" in capsys.readouterr().out


def test_a_failed_push_to_a_branch_prints_a_retry_with_the_branch_and_message(run, tmp_path, monkeypatch, capsys):
    root, _ = run
    FakeHub(monkeypatch, fail=True)
    out = tmp_path / "export"
    assert main(["export", str(root), "--out", str(out), "--push-to-hub", "my-org/x", "--revision", "v2",
                 "--commit-message", "v2 weights"]) == 2
    retry = f"t2r export {out.resolve()} --push-to-hub my-org/x --revision v2 --commit-message 'v2 weights'"
    assert retry in capsys.readouterr().err


def test_an_export_whose_card_still_names_a_local_path_is_not_pushed(run, tmp_path, monkeypatch, capsys):
    """An export written by an older t2r (no location in its manifest) and moved since: its card names the
    old folder, which the push cannot tell from the new one, so nothing is uploaded."""
    root, _ = run
    hub = FakeHub(monkeypatch)
    old = tmp_path / "export"
    assert main(["export", str(root), "--out", str(old)]) == 0
    manifest = json.loads((old / "t2r_export.json").read_text())
    del manifest["location"]
    (old / "t2r_export.json").write_text(json.dumps(manifest))
    moved = old.rename(tmp_path / "moved")
    assert main(["export", str(moved), "--push-to-hub", "my-org/x"]) == 2
    err = capsys.readouterr().err
    assert f"names the local path {old.resolve()}" in err and "Nothing was uploaded" in err
    assert [c[0] for c in hub.calls] == []
