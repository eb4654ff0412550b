"""logging.profile_steps: a run writes OUTPUT/profile.txt for the steps asked for, and bad ranges are refused."""
import pytest

from t2r.errors import T2RError
from t2r.train.config import load_config
from t2r.train.run_folder import RunFolder
from tests.train.runs import TINY, finetune_cmd, metrics, run


def test_profiled_steps_are_written_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    r = run(finetune_cmd(out, "stages.0.steps=2", "stages.1.steps=2", "logging.tensorboard=false",
                         "logging.profile_steps=[2, 3]", "checkpoint.every_steps=100"))
    assert r.returncode == 0, r.stderr
    report = RunFolder(out).profile.read_text().splitlines()
    assert report[0].startswith("steps 2..3 (2): ") and report[0].endswith("ms wall per step")
    wall = float(report[0].split()[3])
    # step 2 is attention transfer, step 3 a finetune step with the teacher's KL: every phase ran
    phases = dict(p.rsplit(" ", 1) for p in report[1].split(": ", 1)[1].split(", "))
    assert set(phases) == {"data", "forward", "teacher_forward", "losses", "backward", "wait_for_gpu", "optimizer"}
    assert 0 < float(phases["forward"]) and sum(map(float, phases.values())) <= wall * 1.05
    assert report[2].startswith("CPU operators: ") and report[2].endswith("ms self time per step")
    ops = [line.split(None, 3)[3] for line in report[4:]]
    assert len(ops) >= 10 and any(op.startswith("aten::") for op in ops)  # what the forward and backward ran
    assert not any(op.startswith("t2r.") for op in ops)  # the phases are not operators
    shares = [float(line.split()[0].rstrip("%")) for line in report[4:]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]  # every step ran, the last after the profile ended
    assert RunFolder(out).model.is_dir()


@pytest.mark.parametrize("steps", ["[3, 2]", "[0, 1]", "[4]"])
def test_a_bad_range_is_refused_before_the_run(steps):
    with pytest.raises(T2RError, match="profile_steps"):
        load_config(TINY, [f"logging.profile_steps={steps}"])
