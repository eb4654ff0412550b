"""Run from the checkout, the repository's ``kernels/`` folder (t2r.kernels) must not hide Hugging Face's
``kernels`` package, which transformers 5.25+ imports when it loads any model class."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("first", ["kernels", "transformers", "t2r"])
def test_transformers_models_import_from_the_repository_root(first):
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = (f"import {first}\n"
            "from transformers import PreTrainedModel\n"
            "import kernels, t2r.kernels.gsa\n"
            "import t2r.kernels as ours\n"
            "assert kernels is not ours, 'kernels is the checkout folder'\n"
            "assert os.path.dirname(kernels.__file__) != os.path.join(os.getcwd(), 'kernels')\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", "import os\n" + code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
