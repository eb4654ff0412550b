"""`t2r export --push-to-hub`, tested at the huggingface_hub boundary (the Hub is unreachable here):
HfApi.create_repo / upload_folder are replaced by recorders."""
import logging
import shlex

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from t2r.cli import main
from tests.test_export_fixtures import IDS, make_run

TOKEN = "hf_SENTINELtoken0123456789abcdefXYZ"


class FakeHub:
    """Records create_repo / upload_folder calls; ``fail`` makes uploads raise (with the token in the text,
    as a careless HTTP error might)."""

    def __init__(self, monkeypatch, fail=False):
        self.calls, self.fail, self.uploaded_files = [], fail, []
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kw):
            hub.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, **kw}))
            if hub.fail:
                raise OSError(f"503 Service Unavailable (request had Authorization: Bearer {TOKEN})")
            from pathlib import Path

            hub.uploaded_files = sorted(p.name for p in Path(folder_path).iterdir())
            return "commit"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
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
             (["--out", "e", "--max-shard-size", "5 gigs"], "--max-shard-size '5 gigs' is not a size")]
    for args, message in cases:
        assert main(["export", str(root), *[str(tmp_path / a) if a == "e" else a for a in args]]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
