"""engine.device = cuda: the CPU's numbers (float tolerance), reproducible run to run, the vectorized
engine's ResNet-20 rows equal the serial engine's (to float32's reach), batches copied per step change nothing, and a
device the machine lacks is a clear error. The tests marked ``gpu`` skip without CUDA
(``pytest -m gpu tests/test_gpu.py`` on a GPU machine; bench/gpu_check.sh runs them); the last test
runs everywhere: bench/gpu.py stops with exit code 2 where there is no CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedloom
from fedloom.config import ConfigError
from helpers import stepper, train_once

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ENGINES = pytest.mark.parametrize("engine", ["vectorized", "serial"])
DIGITS = ["data.dataset=digits", "rounds=2", "client.epochs=2", "evaluation.federated=false"]
GPU_BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def digits_run(quick, device, *overrides):
    return fedloom.run(None, [*quick, *DIGITS, f"engine.device={device}", *overrides])


@pytest.fixture
def fp32_convolutions():
    """cuDNN convolutions in TF32 (torch's default) round their inputs to 10 mantissa bits, and the
    vectorized engine's grouped convolutions take other kernels than the serial engine's: their rows
    agree to float32 tolerance only in float32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
@needs_cuda
@ENGINES
def test_cuda_trains_the_model_the_cpu_trains(quick, engine):
    cuda = digits_run(quick, "cuda", f"engine.name={engine}")
    cpu = digits_run(quick, "cpu", f"engine.name={engine}")
    assert cuda.summary["device"] == "cuda" and cpu.summary["device"] == "cpu"
    assert cuda.params.device.type == "cpu"  # the state tree stays on the CPU
    torch.testing.assert_close(cuda.params, cpu.params, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@ENGINES
def test_two_cuda_runs_give_the_same_bits(quick, engine):
    first = digits_run(quick, "cuda", f"engine.name={engine}", "client.momentum=0.9")
    second = digits_run(quick, "cuda", f"engine.name={engine}", "client.momentum=0.9")
    assert torch.equal(first.params, second.params)


@pytest.fixture
def cifar_shaped(tmp_path, quick):
    """Overrides for ResNet-20 (GroupNorm) on 48 random CIFAR-shaped images (normalized, as CIFAR is)
    over 4 clients of 12: two local steps of 6 each."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g).numpy(), torch.randint(0, 10, (64,), generator=g).numpy()
    path = tmp_path / "cifar_shaped.npz"
    np.savez(path, x=x[:48], y=y[:48], x_test=x[48:], y_test=y[48:])
    return [*quick, "data.dataset=npz", f"data.options.path={str(path)!r}", "data.n_clients=4",
            "data.client_test_fraction=0", "sampling.clients_per_round=4", "rounds=1", "model.name=resnet20",
            "client.lr=0.01", "client.epochs=1", "client.batch_size=6", "evaluation.federated=false",
            "engine.device=cuda"]


@pytest.mark.gpu
@needs_cuda
def test_resnet20_rows_on_cuda_are_the_serial_engines(cifar_shaped, fp32_convolutions):
    serial, vectorized = (stepper(*cifar_shaped, f"engine.name={name}") for name in ("serial", "vectorized"))
    assert torch.equal(vectorized.state["x"], serial.state["x"])  # the same start
    a = train_once(serial, serial.state["x"], range(4))
    b = train_once(vectorized, vectorized.state["x"], range(4))
    assert b.U.device.type == "cpu" and b.U.shape == a.U.shape and a.U.abs().sum() > 0
    # Not elementwise: in float32 a ReLU whose input is within rounding of 0 can open in one engine and
    # not the other, and that unit's share of the gradient then differs. On the CPU (same settings, six
    # seeds) a client's row differed by up to 2.7e-3 of its norm, or 1e-6 where none flipped; in float64
    # by 1e-15. A client's row given to another would differ by about its whole norm.
    gap = (b.U - a.U).norm(dim=1) / a.U.norm(dim=1)
    assert gap.max() < 2e-2, gap
    torch.testing.assert_close(b.train_loss, a.train_loss, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@ENGINES
def test_batches_copied_each_step_give_the_data_on_device_result(quick, engine):
    on, off = (stepper(*quick, *DIGITS, f"engine.name={engine}", "engine.device=cuda",
                       f"engine.data_on_device_gb={gb}") for gb in (1, 0))
    assert on.engine.examples.home.type == "cuda" and off.engine.examples.home.type == "cpu"
    for r in (1, 2):
        on.round(r)
        off.round(r)
    assert torch.equal(on.state["x"], off.state["x"])


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_device_the_machine_lacks_is_a_config_error_naming_it(quick):
    with pytest.raises(ConfigError, match=r"engine.device = 'cuda:99'.*available: cpu, cuda"):
        fedloom.run(None, [*quick, "engine.device=cuda:99"])


def test_bench_gpu_stops_without_cuda_with_exit_code_2_and_says_why():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, on any machine
    shown = subprocess.run([sys.executable, str(GPU_BENCH), "--help"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert shown.returncode == 0 and "--allow-cpu" in shown.stdout and "--cifar" in shown.stdout
    refused = subprocess.run([sys.executable, str(GPU_BENCH), "--rounds", "1"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "runs on a CUDA GPU" in refused.stderr and "--allow-cpu" in refused.stderr
    assert refused.stdout == ""  # stopped before running anything
