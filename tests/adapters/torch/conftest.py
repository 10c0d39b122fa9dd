"""Shared fixtures for the PyTorch adapter tests: small models, data, and an explicit-Hessian oracle."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _explicit_hessian(model, loss_of_output, inputs):
    """The Hessian of loss_of_output(model(inputs)) w.r.t. all parameters (flattened, in order)."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(vector):
        chunks = torch.split(vector, sizes)
        tensors = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_of_output(functional_call(model, tensors, (inputs,)))

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(f, flat)


@pytest.fixture
def explicit_hessian():
    return _explicit_hessian


def flatten(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.fixture
def flat():
    return flatten


class TinyAttention(torch.nn.Module):
    """A pre-LN causal self-attention block with SDPA (the CPU flash kernel is not twice differentiable)."""

    def __init__(self, width=8, heads=2, classes=4):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, classes)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c)).mean(dim=1)


@pytest.fixture
def small_problems():
    """name -> (model factory, inputs, targets) for an MLP, a CNN and an attention block."""
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)),
                torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)),
        "cnn": (lambda: torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GELU(), torch.nn.Flatten(),
                                            torch.nn.Linear(3 * 4 * 4, 3)),
                torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)),
        "attention": (lambda: TinyAttention(), torch.randn(4, 5, 8, generator=g),
                      torch.randint(0, 4, (4,), generator=g)),
    }


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.fixture
def quadratic():
    """f(w) = 1/2 w^T A w - b^T w in float64, as (parameter, loss function, A, b)."""
    g = torch.Generator().manual_seed(3)
    n = 12
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def loss():
        return 0.5 * w @ a @ w - b @ w

    return w, loss, a, b


def closure_for(optimizer, loss_fn):
    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


@pytest.fixture
def make_closure():
    return closure_for


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)
