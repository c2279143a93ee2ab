"""The routes that ``run.py`` times: random problems and one optimiser step of each route.

Routes (all share the data, the MLP, the training loop's Adam and its per-SAE
clipping, and take one full optimiser step: forward, backward, clip, Adam, decoder
renormalisation, through :func:`sklearn_jsae._backend.step.optimiser_step`):

``jsae``          our JSAE step: :func:`sklearn_jsae._backend.step.jsae_step_losses` and
                  :func:`~sklearn_jsae._backend.step.optimiser_step`, the functions the
                  training loop calls;
``pair``          the same with ``l1=None``: two ordinary TopK SAEs (the traditional pair);
``authors``       the authors' route re-implemented as ../shared/PAPER.md describes it: full
                  products ``W_dec_x @ W_in`` and ``W_enc_y @ W_out^T`` for all n latents every
                  step, gathered per sample, ``|J|`` by plain autograd; TopK by ``topk`` on the
                  dense pre-activations with dense autograd through the encoder; dense decode
                  (scatter into (B, n) codes, then a dense matmul);
``authors_pair``  the authors' SAE pair alone (dense encoder and decode, no Jacobian);
``naive``         the dense (n_out, n_in) Jacobian of ``s_x ↦ s_y`` per token by reverse-mode
                  autograd (``torch.func.jacrev``), penalty and its backward; a few tokens only.

Every route computes the MLP's hidden pre-activation once and takes both the true
output ``y`` and ``φ'`` from it, so no route pays for the MLP twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from sklearn_jsae._backend.mlp import ElementwiseMLP, activation, activation_derivative
from sklearn_jsae._backend.optim import Adam
from sklearn_jsae._backend.sae import SAEParams, pre_activations
from sklearn_jsae._backend.step import jsae_step_losses, optimiser_step

L1 = 0.5  # the estimator's default weight; the penalty normalisation is train()'s


@dataclass
class Config:
    """One benchmark configuration: widths, dictionary size, k and batch, and where it runs."""

    name: str
    d: int
    d_mlp: int
    n: int
    k: int
    batch: int
    devices: tuple  # device types it runs on

    def as_dict(self):
        return dict(d=self.d, d_mlp=self.d_mlp, n=self.n, k=self.k, batch=self.batch)


CONFIGS = {
    "minilm": Config("minilm", 384, 1536, 2048, 32, 1024, ("cpu",)),
    "pythia70m": Config("pythia70m", 512, 2048, 16384, 32, 4096, ("cuda",)),
    "pythia410m": Config("pythia410m", 1024, 4096, 65536, 32, 4096, ("cuda",)),
}

STEP_ROUTES = ("jsae", "pair", "authors", "authors_pair")


def random_mlp(config: Config, device, seed: int = 0) -> ElementwiseMLP:
    """A GELU MLP of a transformer's scale: inputs ~ N(0, 1) (post-LayerNorm), hidden
    pre-activations of std ≈ 1.5 with a negative bias (so φ' varies over its range),
    outputs of std ≈ 0.5."""
    g = torch.Generator().manual_seed(seed)
    d, m = config.d, config.d_mlp
    W_in = torch.randn(d, m, generator=g) * (1.5 / math.sqrt(d))
    b_in = torch.randn(m, generator=g) * 0.3 - 0.5
    W_out = torch.randn(m, d, generator=g) * (0.7 / math.sqrt(m))
    b_out = torch.randn(d, generator=g) * 0.05
    return ElementwiseMLP(W_in, b_in, W_out, b_out, "gelu").to(device)


def random_inputs(config: Config, device, seed: int = 1) -> torch.Tensor:
    """(batch, d) standard normal rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(config.batch, config.d, generator=g).to(device)


class Route:
    """Parameters, optimiser and step function of one route on one problem."""

    def __init__(self, name: str, config: Config, mlp: ElementwiseMLP, x: torch.Tensor, seed: int = 2):
        self.name, self.config, self.mlp, self.x = name, config, mlp, x
        g = torch.Generator().manual_seed(seed)
        device = x.device
        with torch.no_grad():
            y = mlp(x)
        self.side_x = SAEParams.initialise(config.n, config.d, x.mean(0).cpu(), g).to(device).requires_grad_()
        self.side_y = SAEParams.initialise(config.n, config.d, y.mean(0).cpu(), g).to(device).requires_grad_()
        self.sides = [self.side_x, self.side_y]
        tensors = [t for side in self.sides for t in side.tensors()]
        self.optimiser = Adam(tensors, lr=5e-4, betas=(0.9, 0.999))  # the training loop's optimiser
        self.penalty_norm = 1.0 / math.sqrt(config.d * config.d)

    def step(self) -> float:
        """One optimiser step; returns the loss."""
        if self.name == "jsae":
            loss, _, _ = jsae_step_losses(self.side_x, self.side_y, self.mlp, self.x, self.config.k,
                                          l1=L1, penalty_norm=self.penalty_norm)
        elif self.name == "pair":
            loss, _, _ = jsae_step_losses(self.side_x, self.side_y, self.mlp, self.x, self.config.k, l1=None)
        elif self.name == "authors":
            loss = authors_losses(self.side_x, self.side_y, self.mlp, self.x, self.config.k, L1, self.penalty_norm)
        elif self.name == "authors_pair":
            loss = authors_losses(self.side_x, self.side_y, self.mlp, self.x, self.config.k, None, 0.0)
        else:
            raise ValueError(self.name)
        optimiser_step(loss, self.optimiser, self.sides, 1.0)
        return float(loss.detach())


def _authors_side(params: SAEParams, v: torch.Tensor, k: int):
    """Dense TopK SAE forward as the authors train it: autograd through all n pre-activations,
    TopK values scattered into a dense (B, n) code, decoded by one dense matmul."""
    pre = pre_activations(params, v)  # (B, n), in the autograd graph
    top = pre.topk(k, dim=1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
    v_hat = codes @ params.W_dec + params.b_dec
    return F.mse_loss(v_hat, v), top.indices


def authors_losses(side_x: SAEParams, side_y: SAEParams, mlp: ElementwiseMLP, x: torch.Tensor, k: int,
                   l1: float | None, penalty_norm: float) -> torch.Tensor:
    """The authors' JSAE loss (route (a) of PAPER.md), re-implemented plainly.

    x (B, d_in); returns the () loss.  ``l1=None`` gives their l1 = 0 pair.
    """
    with torch.no_grad():
        z = mlp.pre_activation(x)  # (B, d_mlp)
        y = activation(mlp.activation, z) @ mlp.W_out + mlp.b_out
        phi_prime = activation_derivative(mlp.activation, z)  # (B, d_mlp)
    mse_x, idx_x = _authors_side(side_x, x, k)
    mse_y, idx_y = _authors_side(side_y, y, k)
    loss = mse_x + mse_y
    if l1 is None:
        return loss
    full_in = side_x.W_dec @ mlp.W_in  # (n_in, d_mlp): every latent, every step
    full_out = side_y.W_enc @ mlp.W_out.T  # (n_out, d_mlp)
    A = full_in[idx_x]  # (B, k, d_mlp) gathered per sample
    C = full_out[idx_y] * phi_prime[:, None, :]  # (B, k, d_mlp)
    J = torch.bmm(C, A.transpose(1, 2))  # (B, k_out, k_in)
    return loss + l1 * penalty_norm * J.abs().sum(dim=(1, 2)).mean()


def naive_token_step(route: Route, token: int, chunk_size: int | None = None) -> float:
    """Naive route for one token: the dense (n_out, n_in) Jacobian of ``s_x ↦ s_y`` by
    ``torch.func.jacrev`` (input SAE error held fixed, output active set held fixed),
    ``|J|`` summed over the active block, and the backward into both SAEs.  Returns the penalty."""
    from torch.func import jacrev

    side_x, side_y, mlp, k = route.side_x, route.side_y, route.mlp, route.config.k
    x = route.x[token : token + 1]  # (1, d)
    with torch.no_grad():
        pre_x = pre_activations(side_x, x)[0]
        idx_x = pre_x.topk(k).indices
        s_x = torch.zeros_like(pre_x).scatter(0, idx_x, F.relu(pre_x[idx_x]))  # (n_in,)
        y = mlp(x)
        idx_y = pre_activations(side_y, y)[0].topk(k).indices
        error = x[0] - (s_x @ side_x.W_dec + side_x.b_dec)  # held fixed
    mask = torch.zeros(side_y.W_enc.shape[0], device=x.device, dtype=x.dtype)
    mask[idx_y] = 1.0  # TopK / ReLU derivative: 1 on the active output set

    def latent_map(s):  # (n_in,) -> (n_out,)
        x_rec = s @ side_x.W_dec + side_x.b_dec + error
        y_rec = mlp(x_rec.unsqueeze(0))[0]
        return mask * ((y_rec - side_y.b_dec) @ side_y.W_enc.T + side_y.b_enc)

    J = jacrev(latent_map, chunk_size=chunk_size)(s_x)  # (n_out, n_in), dense
    penalty = J[idx_y][:, idx_x].abs().sum()
    route.optimiser.zero_grad(set_to_none=True)
    penalty.backward()
    return float(penalty.detach())
