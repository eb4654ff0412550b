"""Converted models by Hub id: `t2r generate ORG/NAME` (the command a model card prints), `t2r finetune`
with model.source ORG/NAME and `t2r export ORG/NAME`. The Hub is unreachable here, so its servers are
stood in for at huggingface_hub's boundary (FakeHub): snapshot_download writes the real cache layout,
and a local TCP listener is the endpoint t2r's reachability probe connects to."""
import hashlib
import json
import socket
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub.utils import are_progress_bars_disabled, filter_repo_objects
from transformers.utils import logging as hf_logging

from t2r.cli import main
from t2r.train.run_folder import RunFolder

REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download
REPO = "my-org/tiny-gsa"
PROMPT = ["--prompt", "def add(a, b):", "--max-new-tokens", "12"]


class FakeHub:
    """Repos are local folders. Online, snapshot_download "downloads" a repo's files (after allow/ignore
    patterns) into the Hugging Face cache as huggingface_hub lays it out (blobs, snapshots/COMMIT, refs/main);
    with local_files_only it is huggingface_hub's own snapshot_download, reading that cache."""

    def __init__(self, monkeypatch, cache: Path):
        self.repos, self.downloads, self.cache = {}, [], cache
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        self.endpoint = socket.socket()
        self.endpoint.bind(("127.0.0.1", 0))
        self.endpoint.listen(16)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{self.endpoint.getsockname()[1]}")

    def go_offline(self):
        self.endpoint.close()  # the endpoint refuses connections from now on

    def snapshot_download(self, repo_id, *, local_files_only=False, allow_patterns=None, ignore_patterns=None, **kw):
        self.downloads.append({"repo_id": repo_id, "local_files_only": local_files_only,
                               "progress_bars": not are_progress_bars_disabled()})
        if local_files_only:
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, local_files_only=True, allow_patterns=allow_patterns,
                                          ignore_patterns=ignore_patterns, **kw)
        assert self.endpoint.fileno() != -1, "t2r went to the Hub while it is unreachable"
        source = self.repos[repo_id]
        names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1("".join(names).encode() + repo_id.encode()).hexdigest()
        snapshot = storage / "snapshots" / commit
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            data = (source / name).read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1), "blobs", blob.name))
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(commit)
        return str(snapshot)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A folder `t2r convert` wrote (8 slots, layer 1 kept softmax: unlike configs/tiny.yaml's conversion)."""
    out = tmp_path_factory.mktemp("converted") / "tiny-gsa"
    assert main(["convert", "tiny-random-llama", "--out", str(out), "--num-slots", "8", "--softmax-layers", "1"]) == 0
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path, converted):
    fake = FakeHub(monkeypatch, tmp_path / "hf-cache")
    fake.repos[REPO] = converted
    yield fake
    fake.endpoint.close()


def test_generate_from_a_hub_id_prints_what_the_local_folder_prints(hub, converted, capsys):
    assert main(["generate", str(converted), *PROMPT]) == 0
    local = capsys.readouterr().out
    assert local.strip()

    assert main(["generate", REPO, *PROMPT]) == 0
    assert capsys.readouterr().out == local
    assert [d["repo_id"] for d in hub.downloads] and {d["repo_id"] for d in hub.downloads} == {REPO}
    assert all(d["progress_bars"] for d in hub.downloads)  # downloads show their progress...
    assert not hf_logging.is_progress_bar_enabled()  # ...while transformers' own bars stay off
    snapshot = next((hub.cache / "models--my-org--tiny-gsa" / "snapshots").iterdir())
    assert {p.name for p in snapshot.iterdir()} == {p.name for p in converted.iterdir()}

    hub.go_offline()  # the cached copy serves the same command without the Hub
    hub.downloads.clear()
    assert main(["generate", REPO, *PROMPT]) == 0
    assert capsys.readouterr().out == local
    assert hub.downloads and all(d["local_files_only"] for d in hub.downloads)


def test_finetune_from_the_hub_id_of_a_converted_model(hub, tmp_path, capsys):
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text())
    config["model"]["source"] = REPO  # its conversion options (16 slots, ...) do not apply to a converted model
    config["data"].update(max_documents=12, seq_len=64)
    config["stages"] = [{"name": "attention_transfer", "steps": 2, "lr": 1.0e-2}]
    config.update(eval={"every_steps": 100, "max_batches": 1}, checkpoint={"every_steps": 100},
                  logging={"progress_bar": False, "tensorboard": False, "wandb": False},
                  output_dir=str(tmp_path / "run"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", str(tmp_path / "run.yaml")]) == 0
    assert f"loaded converted model {REPO}" in capsys.readouterr().out
    trained = json.loads((RunFolder(tmp_path / "run").model / "config.json").read_text())
    assert trained["num_slots"] == 8 and trained["gsa_layers"] == [0, 2, 3]  # the Hub model, finetuned
    assert json.loads(RunFolder(tmp_path / "run").summary.read_text())["base_model"] == REPO


def test_export_from_a_hub_id_writes_a_loadable_export(hub, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", REPO, "--out", str(out)]) == 0
    manifest = json.loads((out / "t2r_export.json").read_text())
    assert manifest["format"] == "model" and {"model.safetensors", "modeling_t2r.py"} <= set(manifest["files"])
    assert main(["generate", str(out), *PROMPT]) == 0  # the export runs


@pytest.mark.parametrize("command", [
    ["generate", "my-org/absent", *PROMPT],
    ["export", "my-org/absent", "--out", "{tmp}/export"],
    ["finetune", "{tmp}/run.yaml"],
])
def test_an_uncached_hub_id_while_offline_fails_at_once_naming_hf_download(hub, tmp_path, capsys, command):
    (tmp_path / "run.yaml").write_text(
        (Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text()
        .replace("source: tiny-random-llama", "source: my-org/absent").replace("runs/tiny", str(tmp_path / "run")))
    hub.go_offline()
    before = sorted(tmp_path.iterdir())
    assert main([a.replace("{tmp}", str(tmp_path)) for a in command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "my-org/absent is not in the local Hugging Face cache" in err[0]
    assert "hf download my-org/absent" in err[0] and "huggingface-cli" not in err[0]
    assert sorted(tmp_path.iterdir()) == before and hub.downloads == []  # nothing written, nothing fetched


def test_a_teacher_on_the_hub_is_not_taken_for_a_converted_model(hub, tmp_path, capsys):
    """`t2r export` of an unconverted model's Hub id says to convert it first (only its config is fetched)."""
    from t2r.tiny import tiny_teacher

    teacher, tok = tiny_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    hub.repos["my-org/teacher"] = tmp_path / "teacher"
    assert main(["export", "my-org/teacher", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "my-org/teacher on the Hub is not a converted model" in err and "t2r convert my-org/teacher" in err
    snapshot = next((hub.cache / "models--my-org--teacher" / "snapshots").iterdir())
    assert [p.name for p in snapshot.iterdir()] == ["config.json"] and not (tmp_path / "e").exists()

