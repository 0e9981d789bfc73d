"""The ``rllib`` learner's minibatch step for a stacked pair of RNNs, written out by hand in numpy (issue 6).

The ``rllib`` preset takes 960 minibatch steps per update (30 epochs × 32 minibatches), each over both agents' 6-7
sequences of 20 steps: [7, 256] × [256, 256] products, so small that torch's per-op dispatch and autograd's
bookkeeping cost more than the arithmetic. :class:`KLPenaltyMinibatches` computes what
:func:`interbrain.ppo.stacked_kl_penalty_loss` and its ``backward`` compute (the stacked RNN's recurrence from the
sequences' stored initial states, the joint heads, the KL-penalty PPO loss, the norm penalties), as numpy calls on
buffers allocated once per update, and writes every parameter's gradient into buffers that are the stacked
parameters' ``.grad``: torch's fused Adam then takes the step, as on the torch path.

One minibatch of E units, each n sequences of L steps, in unit-major buffers (``hidden`` [E, L + 1, n, H], step 0
the initial states; the recurrence's step products per unit are contiguous [n, H] blocks):

- input: x_t = W_ih^T[own] + W_ih^T[100 + partner] + b_ih + b_hh, two row gathers from the stacked ``input_rows``
  (W_ih^T), which for the update lives in a buffer with one extra zero row (the "partner not shown" row);
- recurrence: h_t = ReLU(x_t + h_{t-1} W_hh^T), one compiled call per step for both units with the ReLU fused in
  (:mod:`interbrain.agents.small_products`, on processors with AVX-512), else MKL through ``torch.bmm`` on the same
  buffers and numpy's add and ReLU (:data:`STEP_PRODUCTS`);
- heads: [logits, value] = h_t [W_a; W_v]^T + [b_a; b_v]; the loss and its gradient per step as in
  :class:`interbrain.ppo.StackedKLPenaltyLoss` (the same formulas; the old policy's log-probabilities, probabilities
  and the taken action's one-hot are computed once per update);
- backward: dL/dh_t = g_heads,t [W_a; W_v] + dL/dx_{t+1} W_hh, dL/dx_t = dL/dh_t · [h_t > 0] (the step products as
  the forward's, the mask fused in); dW_hh = sum_t (dL/dx_t)^T h_{t-1} as one product over all steps (oneDNN in
  float32 where the dense layers run on it, :func:`add_at_b_onednn`, else OpenBLAS); W_ih's rows and the biases by
  ``index_add_`` and sums;
  λ_rec W_hh / ||W_hh||_F (and λ_in W_ih / ||W_ih||_F) for the norm penalties.

Used where :func:`interbrain.agents.rnn.numpy_steps` sends the stacked recurrence's steps to numpy (CPU, float32,
the ``numpy`` small-step backend, :func:`interbrain.agents.linear.small_backend`); the class itself computes in the
parameters' dtype, so the tests check it in float64 against ``policy_loss``'s autograd agent by agent, and in
float32 against the torch graph (``tests/test_fast_paths.py``).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np
import torch

from interbrain.agents import small_products
from interbrain.agents.base import N_ACTIONS, N_CELLS, action_log_softmax
from interbrain.config import PPOConfig

#: the statistics of one minibatch step, rows of :meth:`KLPenaltyMinibatches.step`'s result (those of
#: :func:`interbrain.ppo.stacked_kl_penalty_loss`)
STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "loss", "recurrent_norm", "aux_loss")


@functools.cache
def _openblas():
    """Two of OpenBLAS's CBLAS calls from the library numpy ships (``numpy.libs``, the ``scipy_``-prefixed
    64-bit-integer build): ``{s,d}omatcopy`` (a transposing copy: [256, 256] float32 in ~9 µs, against ~38 µs for
    torch's ``copy_`` of a transposed view on the development machine) and ``{s,d}gemm`` (for a product added onto
    its output, C = A^T B + C, without a second pass over C). None where numpy has no such library (the callers then
    use torch and numpy)."""
    found = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*.so"))
    try:
        lib = ctypes.CDLL(found[0])
        names = {"omatcopy": "scipy_cblas_{}omatcopy64_", "gemm": "scipy_cblas_{}gemm64_"}
        funcs = {(kind, np.dtype(dt)): getattr(lib, name.format(c)) for kind, name in names.items()
                 for c, dt in (("s", np.float32), ("d", np.float64))}
    except (IndexError, OSError, AttributeError):
        return None
    i, p = ctypes.c_int64, ctypes.c_void_p
    for (kind, dtype), f in funcs.items():
        x = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        f.restype = None
        f.argtypes = ([ctypes.c_int, ctypes.c_int, i, i, x, p, i, p, i] if kind == "omatcopy" else
                      [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, x, p, i, p, i, x, p, i])
    return funcs


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

#: who runs the recurrence's per-step products ([n, 256] x [256, 256] per unit, n = 6-7), forward and backward:
#: ``compiled`` (:mod:`interbrain.agents.small_products`' register-blocked loops, with the step's ReLU or its mask
#: fused in) or ``torch`` (MKL, ``torch.bmm`` on the same buffers, then numpy's add and ReLU). By default compiled where
#: the processor runs AVX-512 (numba then compiles for it) and the hidden width is a multiple of
#: :data:`~interbrain.agents.small_products.COLS`, else torch. Both units' 7-row forward step on session 26's Zen 5:
#: 13.6 µs compiled with the ReLU, 34-38 µs on MKL (AVX2 kernels on AMD) before the add and ReLU; numpy's OpenBLAS
#: took 53 µs with the AVX2 kernels the host's ``OPENBLAS_CORETYPE=Haswell`` selects (16.5 µs with its AVX-512 ones,
#: which sessions 24-25 used where OpenBLAS ran them).
STEP_PRODUCTS = ("compiled", "torch")


def default_step_products(hidden: int = 256) -> str:
    """:data:`STEP_PRODUCTS`'s choice for this process and a hidden width of ``hidden``."""
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return "compiled" if avx512 and small_products.applies(1, hidden) else "torch"


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[e] = src[e]^T for src [E, r, c] (each matrix's rows contiguous and in order, any stride between matrices)
    and a C-contiguous dst [E, c, r]."""
    E, r, c = src.shape
    if not (dst.flags.c_contiguous and dst.shape == (E, c, r) and dst.dtype == src.dtype
            and src.strides[-1] == src.itemsize and src.strides[1] >= c * src.itemsize):
        raise ValueError(f"transpose_into needs src [E, r, c] with contiguous rows in order and a C-contiguous dst "
                         f"[E, c, r], got {src.shape} (strides {src.strides}) and {dst.shape}")
    blas = _openblas()
    if blas is None:
        torch.from_numpy(dst).copy_(torch.from_numpy(src).transpose(1, 2))
        return
    f, lda = blas["omatcopy", src.dtype], src.strides[1] // src.itemsize
    for e in range(E):
        f(_ROW_MAJOR, _TRANS, r, c, 1.0, src[e].ctypes.data, lda, dst[e].ctypes.data, r)


def add_at_b(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """out[e] += a[e]^T b[e] for a [E, K, M], b [E, K, N] (each matrix's rows contiguous, any stride between them)
    and a C-contiguous out [E, M, N]."""
    blas = _openblas()
    if blas is None:
        out += np.matmul(a.transpose(0, 2, 1), b)
        return
    f = blas["gemm", out.dtype]
    (_, K, M), N = a.shape, b.shape[-1]
    if not (out.flags.c_contiguous and a.strides[-1] == b.strides[-1] == out.itemsize and a.dtype == b.dtype == out.dtype):
        raise ValueError("add_at_b needs rows with unit stride and one dtype")
    lda, ldb = a.strides[1] // a.itemsize, b.strides[1] // b.itemsize
    for e in range(out.shape[0]):
        f(_ROW_MAJOR, _TRANS, _NO_TRANS, M, N, K, 1.0, a[e].ctypes.data, lda, b[e].ctypes.data, ldb, 1.0,
          out[e].ctypes.data, N)


def add_at_b_onednn(out: torch.Tensor, a: np.ndarray, b: np.ndarray, a_t: np.ndarray, b_t: np.ndarray) -> None:
    """:func:`add_at_b` (out[e] += a[e]^T b[e]) on oneDNN's dense-layer kernel, which computes x w^T from x and w with
    contiguous rows: x = a[e]^T and w = b[e]^T, for a [E, K, M] and b [E, K, N] transposed into the C-contiguous
    [E, M, K] and [E, N, K] buffers ``a_t`` and ``b_t`` first. float32 (oneDNN's AVX-512 kernels: both units'
    [140, 256]^T x [140, 256] in 225 µs with the transposes and the sum, against 304 µs on OpenBLAS's AVX2 kernels,
    session 26's Zen 5)."""
    transpose_into(a_t, a)
    transpose_into(b_t, b)
    x, w = torch.from_numpy(a_t), torch.from_numpy(b_t)
    for e in range(out.shape[0]):
        out[e] += torch.ops.mkldnn._linear_pointwise(x[e], w[e], None, "none", [], "")


def norm_penalty(w: np.ndarray, coef: float) -> tuple[np.ndarray, np.ndarray]:
    """(||w_e||_F [E], coef / ||w_e||_F [E], 0 where the norm is 0 as in ``FrobeniusNorm``'s backward) for w [E, ...]:
    the penalty coef·||w_e||_F and the scale of its gradient coef·w_e / ||w_e||_F."""
    norm = np.sqrt(np.array([np.vdot(w[e], w[e]) for e in range(w.shape[0])], dtype=w.dtype))
    return norm, np.divide(coef, norm, out=np.zeros_like(norm), where=norm > 0)


_OLD_LOGP, _ADV, _RET, _ONEHOT, _P_OLD, _OLD_LP = 0, 1, 2, slice(3, 7), slice(7, 11), slice(11, 15)


class KLPenaltyMinibatches:
    """The minibatch steps of one ``rllib`` update for ``stack`` (a :class:`~interbrain.agents.rnn.StackedRNN` of E
    units) on that update's data, per unit time-major in sequences: ``index`` [L, E, S, 2] (observation indices),
    ``actions`` [L, E, S], ``old_logp``, ``adv``, ``returns`` [L, E, S], ``old_logits`` [L, E, S, 4], ``states0``
    [E, S, H] (each sequence's initial state). Construction moves ``stack.input_rows`` into a buffer with a zero row
    after it and attaches a gradient buffer to every parameter; :meth:`step` then fills the gradients of one
    minibatch, for the caller's optimizer to step on."""

    STATS = STATS

    def __init__(self, stack, cfg: PPOConfig, index, actions, old_logp, adv, returns, old_logits, states0,
                 step_products: str | None = None, weight_grad_on_onednn: bool | None = None):
        step_products = default_step_products(stack.weight_hh.shape[-1]) if step_products is None else step_products
        if step_products not in STEP_PRODUCTS:
            raise ValueError(f"step_products={step_products!r} is not one of {list(STEP_PRODUCTS)}")
        if step_products == "compiled" and not small_products.applies(1, stack.weight_hh.shape[-1]):
            raise ValueError(f"compiled step products need a hidden width that is a multiple of "
                             f"{small_products.COLS}, got {stack.weight_hh.shape[-1]}")
        self.step_products = step_products
        if weight_grad_on_onednn is None:  # where the dense layers' large products run on oneDNN, in float32
            from interbrain.agents.linear import cpu_backend

            weight_grad_on_onednn = stack.weight_hh.dtype == torch.float32 and cpu_backend() == "onednn"
        elif weight_grad_on_onednn and stack.weight_hh.dtype != torch.float32:
            raise ValueError(f"the weight gradient on oneDNN needs float32 parameters, got {stack.weight_hh.dtype}")
        elif weight_grad_on_onednn:
            from interbrain.agents.linear import onednn_available

            if not onednn_available():
                raise ValueError("the weight gradient on oneDNN needs torch's oneDNN dense-layer kernel, which this "
                                 "torch build lacks")
        self.weight_grad_on_onednn = weight_grad_on_onednn
        E, H = stack.units, stack.weight_hh.shape[-1]
        L, _, S = actions.shape
        self.cfg, self.E, self.H, self.L, self.S = cfg, E, H, L, S
        dtype = stack.weight_hh.dtype
        with torch.no_grad():
            rows = 2 * N_CELLS
            ext = torch.zeros(E * rows + 1, H, dtype=dtype)  # W_ih^T of every unit, then the zero row
            ext[:-1].view(E, rows, H).copy_(stack.input_rows)
            stack.input_rows.data = ext[:-1].view(E, rows, H)
            self.input_ext = ext.numpy()
            for p in stack.parameters():
                p.grad = torch.zeros_like(p)
            self.grad_ext = torch.zeros(E * rows + 1, H, dtype=dtype)  # W_ih^T's gradient, then the zero row's
            stack.input_rows.grad = self.grad_ext[:-1].view(E, rows, H)
            # rows of ``input_ext``: unit e's own cell r -> rows·e + r, partner cell c -> rows·e + 100 + c, partner
            # not shown (c = 100) -> the zero row; unit-major [E, L, S] then flattened
            unit = torch.arange(E).view(1, E, 1) * rows
            own = unit + index[..., 0]
            partner = torch.where(index[..., 1] == N_CELLS, E * rows, unit + N_CELLS + index[..., 1])
            self.own, self.partner = (r.permute(1, 0, 2).reshape(-1).numpy().copy() for r in (own, partner))
            old_lp = action_log_softmax(old_logits)
            onehot = torch.nn.functional.one_hot(actions, N_ACTIONS).to(dtype)
            data = torch.cat([old_logp.unsqueeze(-1), adv.unsqueeze(-1), returns.unsqueeze(-1), onehot, old_lp.exp(),
                              old_lp], -1)
            self.data = data.permute(1, 0, 2, 3).reshape(E * L * S, -1).numpy().copy()
            self.states0 = states0.reshape(E * S, H).numpy().copy()
        self.params = {name: p.detach().numpy() for name, p in stack.named_parameters()}
        self.grads = {name: p.grad.numpy() for name, p in stack.named_parameters()}
        self.base = (np.arange(E * L) * S).reshape(E, L, 1)  # row of (unit e, step t, sequence 0) in the data
        self.unit_seq = (np.arange(E) * S).reshape(E, 1)
        self.wt = np.empty_like(self.params["weight_hh"])
        # torch views of the step products' operands (the same memory), for step_products == "torch"
        self.torch_w, self.torch_wt = torch.from_numpy(self.params["weight_hh"]), torch.from_numpy(self.wt)
        self.torch_grad_whh = torch.from_numpy(self.grads["weight_hh"])
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.torch_buffers: dict[int, dict[str, torch.Tensor]] = {}

    def _buffers(self, n: int) -> dict[str, np.ndarray]:
        if n not in self.buffers:
            E, L, H, dt = self.E, self.L, self.H, self.input_ext.dtype
            self.buffers[n] = {"hidden": np.empty((E, L + 1, n, H), dt), "x": np.empty((E, L, n, H), dt),
                               "g": np.empty((E, L, n, H), dt),
                               "prod": np.empty((E, n, H), dt), "heads": np.empty((E, L * n, N_ACTIONS + 1), dt),
                               "grad_heads": np.empty((E, N_ACTIONS + 1, L * n), dt)}
            if self.weight_grad_on_onednn:  # the transposed copies add_at_b_onednn multiplies
                self.buffers[n] |= {"g_t": np.empty((E, H, L * n), dt), "h_t": np.empty((E, H, L * n), dt)}
            self.torch_buffers[n] = {k: torch.from_numpy(self.buffers[n][k]) for k in ("hidden", "g", "prod")}
        return self.buffers[n]

    def step(self, idx: np.ndarray, kl_coef: np.ndarray, stats: bool = True) -> np.ndarray:
        """One minibatch: sequences ``idx`` [E, n] (each unit's own) with KL coefficients ``kl_coef`` [E]. Writes
        every parameter's gradient of the summed per-unit losses into its ``.grad`` and returns the statistics
        [len(:data:`STATS`), E] (float64); with ``stats`` False only ``approx_kl`` (the learner's KL adaptation needs
        it from every minibatch), the other rows NaN."""
        cfg, E, L, H = self.cfg, self.E, self.L, self.H
        n = idx.shape[1]
        M = L * n  # steps per unit
        kl_coef = np.asarray(kl_coef, dtype=self.input_ext.dtype)
        P, G, buf = self.params, self.grads, self._buffers(n)
        hidden, x, g, prod = buf["hidden"], buf["x"], buf["g"], buf["prod"]
        sel = self.base + idx[:, None, :]  # [E, L, n] rows of the update's data
        data = np.ascontiguousarray(self.data.take(sel, axis=0).reshape(E, M, -1).transpose(0, 2, 1))  # [E, 15, M]
        own, partner = self.own.take(sel), self.partner.take(sel)
        w = P["weight_hh"]
        transpose_into(self.wt, w)  # W_hh^T per unit, for the forward's step products
        rec, scale = norm_penalty(w, cfg.recurrent_l2)  # ||W_hh||_F and its penalty's gradient, while W_hh is in
        np.multiply(w, scale[:, None, None], out=G["weight_hh"])  # cache (dW_hh is added onto it below)

        # forward: inputs, recurrence, heads
        hidden[:, 0] = self.states0.take(idx + self.unit_seq, axis=0)
        states = hidden[:, 1:]
        np.take(self.input_ext, own, axis=0, out=g, mode="clip")  # g and x are free until the backward (contiguous
        np.take(self.input_ext, partner, axis=0, out=x, mode="clip")  # outputs: no buffered copy)
        x += (P["bias_ih"] + P["bias_hh"])[:, None, None, :]
        np.add(g, x, out=states)
        on_torch = self.step_products == "torch"
        tb = self.torch_buffers[n]
        for t in range(L):  # h_{t+1} = ReLU(x_{t+1} + h_t W_hh^T), x_{t+1} already in h_{t+1}'s slot
            if on_torch:
                torch.bmm(tb["hidden"][:, t], self.torch_wt, out=tb["prod"])
                h = hidden[:, t + 1]
                np.add(h, prod, out=h)
                np.maximum(h, 0, out=h)
            else:
                small_products.step_relu(hidden[:, t], self.wt, hidden[:, t + 1])
        head_w = np.concatenate([P["action_weight"], P["value_weight"]], 1)  # [E, 5, H]
        head_b = np.concatenate([P["action_bias"], P["value_bias"]], 1)
        flat = states.reshape(E, M, H)
        heads = np.matmul(flat, head_w.transpose(0, 2, 1).copy(), out=buf["heads"])
        heads = heads.transpose(0, 2, 1) + head_b[:, :, None]  # [E, 5, M]: each head's values contiguous

        # the loss (StackedKLPenaltyLoss's formulas) and its gradient with respect to the heads, per unit [E, ., M].
        # The surrogate min(rho A, clip(rho) A)'s gradient flows through rho A where that branch is the min, ties
        # included: inside the clip range the two are equal and torch's backward sends half through each (the clip
        # passing its half on, its bounds inclusive); outside, a tie needs A = 0, where the gradient is 0 either way
        z, value = heads[:, :N_ACTIONS], heads[:, N_ACTIONS]
        lp = z - z.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        p = np.exp(lp)
        onehot, p_old, adv = data[:, _ONEHOT], data[:, _P_OLD], data[:, _ADV]
        ratio = np.exp((lp * onehot).sum(1) - data[:, _OLD_LOGP])
        lo, hi = 1 - cfg.clip_eps, 1 + cfg.clip_eps
        s1, s2 = ratio * adv, np.clip(ratio, lo, hi) * adv
        err = value - data[:, _RET]
        sq = err * err
        kl_mean = (p_old * (data[:, _OLD_LP] - lp)).sum(1).mean(1)
        gh = buf["grad_heads"]  # [E, 5, M]
        grad_logits = gh[:, :N_ACTIONS]
        np.multiply(onehot - p, (-s1 * (s1 <= s2))[:, None], out=grad_logits)  # d(-surrogate)/dz
        if cfg.entropy_coef or stats:
            entropy = -(p * lp).sum(1)
            if cfg.entropy_coef:
                grad_logits += cfg.entropy_coef * p * (lp + entropy[:, None])
        grad_logits += (p - p_old) * kl_coef[:, None, None]
        grad_logits *= 1.0 / M
        grad_value = gh[:, N_ACTIONS]
        np.multiply(err, sq <= cfg.value_cap, out=grad_value)
        grad_value *= 2.0 * cfg.value_coef / M

        # backward through the heads and the recurrence
        np.matmul(gh.transpose(0, 2, 1).copy(), head_w, out=g.reshape(E, M, H))
        # dL/dx_t = (dL/dh_t from the heads + dL/dx_{t+1} W_hh) where h_t > 0, else 0
        keep = np.greater(states, 0, out=x) if on_torch else None  # in the inputs' buffer, free now: [h_t > 0]
        if on_torch:
            np.multiply(g[:, L - 1], keep[:, L - 1], out=g[:, L - 1])
        else:  # zero where masked, NaN too, as the compiled steps (and torch's threshold_backward) do
            np.copyto(g[:, L - 1], 0, where=~(states[:, L - 1] > 0))
        for t in range(L - 2, -1, -1):
            gt = g[:, t]
            if on_torch:
                torch.bmm(tb["g"][:, t + 1], self.torch_w, out=tb["prod"])
                np.add(gt, prod, out=gt)
                np.multiply(gt, keep[:, t], out=gt)
            else:
                small_products.step_relu_grad(g[:, t + 1], w, gt, states[:, t])
        g_flat = g.reshape(E, M, H)
        h_prev = hidden[:, :L].reshape(E, M, H)
        if self.weight_grad_on_onednn:  # dW_hh = sum_t g_t^T h_{t-1}, onto the norm's
            add_at_b_onednn(self.torch_grad_whh, g_flat, h_prev, buf["g_t"], buf["h_t"])
        else:
            add_at_b(G["weight_hh"], g_flat, h_prev)
        head_grad = np.matmul(gh, flat)  # [E, 5, H]
        G["action_weight"][:], G["value_weight"][:] = head_grad[:, :N_ACTIONS], head_grad[:, N_ACTIONS:]
        head_bias_grad = gh.sum(2)
        G["action_bias"][:], G["value_bias"][:] = head_bias_grad[:, :N_ACTIONS], head_bias_grad[:, N_ACTIONS:]
        np.sum(g_flat, axis=1, out=G["bias_ih"])
        G["bias_hh"][:] = G["bias_ih"]
        ext = self.grad_ext
        ext.zero_()
        rows = torch.from_numpy(g).view(-1, H)
        ext.index_add_(0, torch.from_numpy(own.reshape(-1)), rows)
        ext.index_add_(0, torch.from_numpy(partner.reshape(-1)), rows)

        if cfg.input_l2:
            norm_in, scale_in = norm_penalty(P["input_rows"], cfg.input_l2)
            G["input_rows"] += P["input_rows"] * scale_in[:, None, None]
        result = np.full((len(STATS), E), np.nan)
        result[STATS.index("approx_kl")] = kl_mean
        if stats:
            pg_loss, v_loss, ent = -np.minimum(s1, s2).mean(1), np.minimum(sq, cfg.value_cap).mean(1), entropy.mean(1)
            loss = pg_loss + cfg.value_coef * v_loss - cfg.entropy_coef * ent + kl_coef * kl_mean + cfg.recurrent_l2 * rec
            if cfg.input_l2:
                loss = loss + cfg.input_l2 * norm_in
            clip_fraction = (np.abs(ratio - 1) > cfg.clip_eps).mean(1)
            result[:] = [pg_loss, v_loss, ent, kl_mean, clip_fraction, loss, rec, np.zeros_like(rec)]
        return result
