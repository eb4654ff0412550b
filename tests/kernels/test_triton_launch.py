"""A chunk kernel whose configured pipelining stages need more shared memory than the GPU has runs with
fewer (Triton raises OutOfResources when it loads such a kernel, before anything runs). The GPU's limit
cannot be reached here, so a stand-in kernel raises it as Triton does above a stage count."""
import pytest
from triton.runtime.errors import OutOfResources

from t2r.kernels.gsa._triton_launch import launch


class Kernel:
    """Launches like a Triton kernel (``kernel[grid](**kwargs)``); ``fits`` stages fit in shared memory."""

    def __init__(self, fits: int):
        self.fits, self.tries = fits, []

    def __getitem__(self, grid):
        def run(**kwargs):
            self.tries.append(kwargs["num_stages"])
            if kwargs["num_stages"] > self.fits:
                raise OutOfResources(98304 * kwargs["num_stages"], 232448, "shared memory")
            kwargs["out"].append((grid, kwargs["K"]))
        return run


def test_too_many_stages_step_down_to_what_fits_and_the_count_is_remembered():
    kernel, out = Kernel(fits=1), []
    assert launch(kernel, (4, 2), num_stages=3, out=out, K=128) == 1
    assert kernel.tries == [3, 2, 1] and out == [((4, 2), 128)]  # it ran once, with one stage
    assert launch(kernel, (4, 2), num_stages=3, out=out, K=128) == 1
    assert kernel.tries == [3, 2, 1, 1]  # the count that fit, straight away
    assert launch(kernel, (4, 2), num_stages=3, out=out, K=64) == 1  # other compile-time args: tried afresh
    assert kernel.tries[-3:] == [3, 2, 1] and len(out) == 3


def test_a_kernel_that_fits_keeps_its_stages_and_one_that_never_fits_raises():
    fits = Kernel(fits=3)
    assert launch(fits, (1,), num_stages=3, out=[], K=16) == 3 and fits.tries == [3]
    with pytest.raises(RuntimeError, match="even with one pipelining stage .*T2R_GSA_BACKEND=torch") as err:
        launch(Kernel(fits=0), (1,), num_stages=2, out=[], K=16)
    assert isinstance(err.value.__cause__, OutOfResources)
