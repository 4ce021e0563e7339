"""Each adaptive server optimizer's step equals the optimizer applied by hand
to the pseudo-gradient x - mean(local models) (Reddi et al. 2021)."""

import pytest
import torch
from torch import nn

from fedloom.aggregation.base import mean
from fedloom.algorithms import SERVER_PRESETS, ServerPreset, server_optimizer
from fedloom.pipeline.base import Context, Pipeline
from fedloom.pipeline.transforms import aggregate, server_step


def _round(name, lr, x0, locals_, weights):
    """Rounds of the pipeline's last two steps (mean, then the preset's server optimizer), its state carried."""
    preset = SERVER_PRESETS.get(name, ServerPreset())
    optimizer = server_optimizer(preset.optimizer, lr=lr, momentum=preset.momentum)
    pipeline = Pipeline((aggregate(mean()), server_step(preset.optimizer, optimizer)))
    x, states = x0, pipeline.init(x0.numel())
    for r, local in enumerate(locals_, 1):
        U, _, states, _ = pipeline.apply(x - local, weights, states, Context(r, 0, list(range(len(local))), x))
        x = U[0]
    return x


def _by_hand(opt_cls, x0, locals_, weights, **kw):
    p = nn.Parameter(x0.clone())
    opt = opt_cls([p], **kw)
    for local in locals_:
        p.grad = p.detach() - (weights / weights.sum()) @ local
        opt.step()
    return p.detach()


@pytest.mark.parametrize("name,opt_cls,kw", [
    ("fedadagrad", torch.optim.Adagrad, dict(lr=0.05, initial_accumulator_value=1e-6, eps=1e-3)),
    ("fedavgm", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("fedavg", torch.optim.SGD, dict(lr=0.05)),
])
def test_server_step_equals_torch_optimizer_by_hand(name, opt_cls, kw):
    torch.manual_seed(1)
    x0 = torch.randn(11)
    locals_ = [x0 + torch.randn(4, 11) for _ in range(3)]  # three rounds of four clients
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(_round(name, 0.05, x0, locals_, weights), _by_hand(opt_cls, x0, locals_, weights, **kw))


def test_fedyogi_step_follows_the_paper_update():
    torch.manual_seed(2)
    x0 = torch.randn(9)
    local = x0 + torch.randn(5, 9)
    w = torch.ones(5)
    x1 = _round("fedyogi", 0.1, x0, [local], w)
    delta = local.mean(0) - x0  # Reddi et al.: Delta = mean of (local - global)
    m = 0.1 * delta
    v0 = torch.full_like(x0, 1e-6)
    v = v0 - 0.01 * delta**2 * torch.sign(v0 - delta**2)
    torch.testing.assert_close(x1, x0 + 0.1 * m / (v.sqrt() + 1e-3))


def test_torch_adam_is_torchs_adam():
    torch.manual_seed(1)
    x0 = torch.randn(11)
    locals_ = [x0 + torch.randn(4, 11) for _ in range(3)]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = nn.Parameter(x0.clone())
    opt = server_optimizer("torch_adam", lr=0.05)(p)
    for local in locals_:
        p.grad = p.detach() - (weights / weights.sum()) @ local
        opt.step()
    expected = _by_hand(torch.optim.Adam, x0, locals_, weights, lr=0.05, betas=(0.9, 0.99), eps=1e-3)
    torch.testing.assert_close(p.detach(), expected)


def test_fedadam_follows_the_paper_by_hand():
    # Reddi et al. 2021, Algorithm 2, beta1 = 0.9, beta2 = 0.99, tau = 1e-3, lr = 0.01:
    # m = 0.9 m + 0.1 Delta, v = 0.99 v + 0.01 Delta^2 from v = tau^2 = 1e-6, x += lr m / (sqrt(v) + tau).
    # Delta = (1, -2) then (1, 0):
    #   round 1: m = (0.1, -0.2),   v = (0.99e-6 + 0.01, 0.99e-6 + 0.04)  = (0.01000099, 0.04000099)
    #   round 2: m = (0.19, -0.18), v = (0.99 * 0.01000099 + 0.01, 0.99 * 0.04000099) = (0.0199009801, 0.0396009801)
    deltas = torch.tensor([[1.0, -2.0], [1.0, 0.0]], dtype=torch.float64)
    ms = torch.tensor([[0.1, -0.2], [0.19, -0.18]], dtype=torch.float64)
    vs = torch.tensor([[0.01000099, 0.04000099], [0.0199009801, 0.0396009801]], dtype=torch.float64)
    expected = (0.01 * ms / (vs.sqrt() + 1e-3)).sum(dim=0)
    optimizer = server_optimizer(SERVER_PRESETS["fedadam"].optimizer, lr=0.01)
    pipeline = Pipeline((aggregate(mean()), server_step("adam", optimizer)))
    x, states = torch.zeros(2, dtype=torch.float64), pipeline.init(2)
    for r, delta in enumerate(deltas, 1):  # U = x - local = -Delta
        U, _, states, _ = pipeline.apply(-delta[None], torch.ones(1, dtype=torch.float64), states, Context(r, 0, [0], x))
        x = U[0]
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_server_sgd_is_torch_sgd_bit_for_bit_through_state_dicts(momentum):
    from fedloom.algorithms.server_opt import ServerSGD, step_on_pseudo_gradient

    torch.manual_seed(3)
    ours = nn.Parameter(torch.randn(13))
    theirs = nn.Parameter(ours.detach().clone())
    state, torch_state = None, None
    for _ in range(4):  # rebuilt each round from the saved state, as the server step does
        grad = torch.randn(13)
        mine = ServerSGD(ours, lr=0.7, momentum=momentum)
        reference = torch.optim.SGD([theirs], lr=0.7, momentum=momentum)
        if state is not None:
            mine.load_state_dict(state)
            reference.load_state_dict(torch_state)
        step_on_pseudo_gradient(mine, ours, grad)
        step_on_pseudo_gradient(reference, theirs, grad)
        state, torch_state = mine.state_dict(), reference.state_dict()
        assert torch.equal(ours, theirs)
        assert state["state"].keys() == torch_state["state"].keys()
        if momentum:
            assert torch.equal(state["state"][0]["momentum_buffer"], torch_state["state"][0]["momentum_buffer"])


def test_a_fedavg_run_on_the_vectorized_engine_does_not_import_torch_dynamo():
    """torch.optim's first optimizer imports torch._dynamo (about 1 s of start-up); FedAvg needs none."""
    import subprocess
    import sys

    code = ("import sys, fedloom; fedloom.run({'rounds': 1, 'data': {'n_clients': 4}, 'client': {'epochs': 1},"
            " 'engine': {'name': 'vectorized'}, 'output': {'save': False, 'progress': False}});"
            " print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
