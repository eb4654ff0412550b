"""Realistic mistakes end in one line naming the problem and the remedy, exit code 2, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2r.cli import main
from t2r.errors import T2RError
from t2r.tiny import tiny_teacher


def _run(capsys, *args):
    """(exit code, stderr) of ``t2r ARGS`` run in-process."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return code, err


@pytest.fixture
def no_teacher_load(monkeypatch):
    """Fails the test if the teacher is loaded: the check must come first."""
    def refuse(*a, **k):
        raise AssertionError("the teacher was loaded before --out was checked")
    monkeypatch.setattr("t2r.convert.load_teacher", refuse)


@pytest.fixture
def local_teacher(tmp_path):
    folder = tmp_path / "teacher"
    model, tok = tiny_teacher("llama", num_layers=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_convert_out_that_is_a_file(tmp_path, capsys, no_teacher_load):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    code, err = _run(capsys, "convert", "tiny-random-llama", "--out", out)
    assert code == 2 and f"--out {out} is a file; choose a folder" in err
    assert out.read_text() == "mine" and os.listdir(tmp_path) == ["out.txt"]


def test_convert_out_below_a_file(tmp_path, capsys, no_teacher_load):
    (tmp_path / "f").write_text("mine")
    code, err = _run(capsys, "convert", "tiny-random-llama", "--out", tmp_path / "f" / "out")
    assert code == 2 and f"is inside {tmp_path / 'f'}, which is a file; choose a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_out_in_a_read_only_folder(tmp_path, capsys, no_teacher_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _run(capsys, "convert", "tiny-random-llama", "--out", ro / "sub" / "out")
    finally:
        ro.chmod(0o755)
    assert code == 2 and f"cannot write in {ro}" in err and "choose a folder you can write to" in err
    assert os.listdir(ro) == []


def test_convert_out_not_writable_is_refused_even_as_root(tmp_path, capsys, monkeypatch, no_teacher_load):
    """The same path as the read-only folder, with the probe's failure simulated (tests may run as root)."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("t2r.paths.tempfile.NamedTemporaryFile", denied)
    code, err = _run(capsys, "convert", "tiny-random-llama", "--out", tmp_path / "out")
    assert code == 2 and f"cannot write in {tmp_path} (Permission denied)" in err
    assert "choose a folder you can write to" in err and os.listdir(tmp_path) == []


def test_convert_local_folder_with_corrupt_config(local_teacher, tmp_path, capsys):
    (local_teacher / "config.json").write_text('{"model_type": "llama",')
    code, err = _run(capsys, "convert", local_teacher, "--out", tmp_path / "out")
    assert code == 2 and f"{local_teacher / 'config.json'} is not valid JSON" in err
    assert "restore it from the original checkpoint" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_convert_local_folder_with_damaged_weights(local_teacher, tmp_path, capsys, damage):
    weights = local_teacher / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    code, err = _run(capsys, "convert", local_teacher, "--out", tmp_path / "out")
    assert code == 2 and f"{weights} is not a readable safetensors file" in err
    assert "restore it from the original checkpoint" in err and not (tmp_path / "out").exists()


def test_generate_empty_prompt(capsys):
    code, err = _run(capsys, "generate", "tiny-random-llama", "--prompt", "")
    assert code == 2 and "--prompt is empty; give the text to continue" in err


def test_generate_cuda_without_a_cuda_device(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, err = _run(capsys, "generate", "tiny-random-llama", "--prompt", "hi", "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA device is available here; use --device cpu" in err


def test_generate_negative_temperature(capsys):
    code, err = _run(capsys, "generate", "tiny-random-llama", "--prompt", "hi", "--temperature", "-0.5")
    assert code == 2 and "--temperature must be 0 (greedy) or positive, got -0.5" in err


def test_mistyped_local_path_says_no_such_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "runs" / "tiny-conv").mkdir(parents=True)
    code, err = _run(capsys, "convert", "runs/tiny-cnv", "--out", "out")
    assert code == 2 and "there is no local folder runs/tiny-cnv (did you mean runs/tiny-conv?)" in err
    assert "runs/tiny-cnv is not in the local Hugging Face cache and the Hub is unreachable" in err
    assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_version_and_license(capsys):
    import t2r

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"t2r {t2r.__version__}\n"
    license_file = Path(__file__).resolve().parents[1] / "LICENSE"
    head = license_file.read_text().split()
    assert head[:5] == ["Apache", "License", "Version", "2.0,", "January"] and "END OF TERMS AND CONDITIONS" in \
        license_file.read_text()
    assert (Path(t2r.__file__).parent / "py.typed").is_file()


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def test_import_t2r_still_registers_the_model_type(tmp_path):
    """After ``import t2r`` plain transformers loads a converted folder (README, model cards)."""
    from t2r.convert import convert

    convert("tiny-random-llama", tmp_path / "c", log=lambda *a: None)
    r = _python("import t2r\n"
                "from transformers import AutoModelForCausalLM\n"
                f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r})\n"
                "print(type(m).__name__, isinstance(m, t2r.T2RForCausalLM))")
    assert r.returncode == 0 and r.stdout.split() == ["T2RForCausalLM", "True"], r.stderr


def test_kernel_limits_are_checked_at_conversion(tmp_path, capsys):
    """More slots than the GPU kernels hold fails at conversion, before anything is written, not at
    the first GPU forward."""
    out = tmp_path / "cnv"
    assert main(["convert", "tiny-random-llama", "--out", str(out), "--slots", "256"]) == 2
    err = capsys.readouterr().err
    assert "--num-slots: Input should be less than or equal to 128 (got 256)" in err and not out.exists()
    from t2r.convert import ConversionOptions, config_from_teacher
    from t2r.tiny import tiny_teacher_config

    wide = tiny_teacher_config("llama", head_dim=192)
    with pytest.raises(T2RError, match="head_dim 192 is larger than GSA's GPU kernels hold"):
        config_from_teacher(wide, ConversionOptions())
    assert config_from_teacher(wide, ConversionOptions(softmax_layers="all")).gsa_layers == []


@pytest.mark.parametrize("command", ["convert", "generate"])
def test_pickled_weights_are_refused_naming_safetensors(tmp_path, capsys, command):
    """A local checkpoint whose weights are only a pickle: one clear error, nothing loaded or written."""
    import torch

    teacher, tok = tiny_teacher("llama")
    folder = tmp_path / "pickled"
    teacher.save_pretrained(folder, safe_serialization=False)
    tok.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"planted": 1}, folder / "pytorch_model.bin")
    args = ["convert", str(folder), "--out", str(tmp_path / "out")] if command == "convert" else \
        ["generate", str(folder), "--prompt", "hi"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin: weights only as a pickle file, which t2r never loads" in err and "safetensors" in err
    assert not (tmp_path / "out").exists()
