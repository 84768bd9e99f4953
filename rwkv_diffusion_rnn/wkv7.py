"""The WKV-7 operator of RWKV-7, with three interchangeable backends.

All backends follow the conventions of flash-linear-attention's ``chunk_rwkv7``:

* ``r, w, k, a, b``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``;
* ``w`` is the *log* decay (``w <= 0``; RWKV-7 uses ``-exp(-0.5) * sigmoid(.)``);
* the state ``S`` is ``[B, H, K, V]`` and evolves per token as

      S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
      o_t = scale * S_t^T r_t

  (RWKV-7 passes ``a = -kk`` and ``b = kk * a_gate``).

Backends:

* ``"recurrent"``: the recurrence above, one token at a time. Short, obviously right, slow:
  the reference the others are tested against.
* ``"torch"``: a chunked pure-PyTorch form (diagonal-plus-low-rank / WY representation).
  Inside a chunk everything is dense matrix algebra; only a ``[K, V]`` state crosses chunks.
  Differentiable by autograd; this is the CPU path.
* ``"fla"``: fla's Triton ``chunk_rwkv7`` kernel, CUDA only. fla and Triton are imported
  when this backend runs, never at package import.
* ``"auto"``: ``"fla"`` for CUDA tensors, ``"torch"`` otherwise.

Internally the torch and recurrent backends compute in float32 (float64 if the inputs are
float64), return ``o`` in the input dtype and the final state in the compute dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

BACKENDS = ("auto", "fla", "torch", "recurrent")
DEFAULT_CHUNK_SIZE = 64
# Largest |log decay| accumulated over half a chunk that the factorised chunk form may meet:
# exp(+-40) stays far inside float32's range (and float64's).
_MAX_HALF_CHUNK_DECAY = 40.0


def _check_inputs(r, w, k, v, a, b, initial_state):
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)} but r has {tuple(r.shape)}; "
                             "r, w, k, a, b must all be [B, T, H, K]")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"wkv7: v must be [B, T, H, V] with B, T, H of r {tuple(r.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if initial_state is not None:
        B, _, H, K = r.shape
        want = (B, H, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"wkv7: initial_state must be [B, H, K, V] = {want}, "
                             f"got {tuple(initial_state.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def wkv7_recurrent(r, w, k, v, a, b, scale: float = 1.0, initial_state=None,
                   output_final_state: bool = False):
    """Reference: the plain per-token recurrence (see module docstring)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    dt = _compute_dtype(r)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    S = (torch.zeros(B, H, K, V, dtype=dt, device=r.device) if initial_state is None
         else initial_state.to(dt))
    outs = []
    # unbind over time (not x[:, t]), so the backward pass stays linear in T
    for r_t, w_t, k_t, v_t, a_t, b_t in zip(*(x.unbind(1) for x in (r, w, k, v, a, b))):
        sa = torch.einsum("bhk,bhkv->bhv", a_t, S)                           # a_t^T S_{t-1}
        S = (S * w_t.exp().unsqueeze(-1)
             + b_t.unsqueeze(-1) * sa.unsqueeze(-2)
             + k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
        outs.append(torch.einsum("bhk,bhkv->bhv", r_t * scale, S))
    o = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(v.dtype), (S if output_final_state else None)


def wkv7_torch(r, w, k, v, a, b, scale: float = 1.0, initial_state=None,
               output_final_state: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Chunked WKV-7 in plain PyTorch.

    Within a chunk of length L starting from state S0, write g_t for the cumulative log
    decay (inclusive) and u_t = S_{t-1}^T a_t. Unrolling the recurrence gives

        S_t = e^{g_t} S0 + sum_{i<=t} e^{g_t - g_i} (b_i u_i^T + k_i v_i^T)
        u_t = S0^T (a_t e^{g_{t-1}}) + sum_{i<t} <a_t e^{g_{t-1}-g_i}, b_i> u_i
                                       + <a_t e^{g_{t-1}-g_i}, k_i> v_i

    so U = (I - A_ab)^{-1} [(a e^{g_prev}) S0 + A_ak V] with strictly lower-triangular A_ab,
    A_ak: one unit-triangular solve per chunk. All intra-chunk matrices are built for all
    chunks at once; the only sequential work is S0 -> S_L, an affine map S -> M S + C.

    Decay factors are taken relative to the middle of each chunk, so the exponentials stay
    within exp(+-L/2 * max|w|): with RWKV-7's |w| <= exp(-0.5) and L = 64 that is e^19.4.
    Stronger decays get a smaller chunk automatically, so any w <= 0 is handled.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    dt = _compute_dtype(r)
    if T == 0:
        S = (torch.zeros(B, H, K, V, dtype=dt, device=r.device) if initial_state is None
             else initial_state.to(dt))
        return v.new_zeros(B, 0, H, V), (S if output_final_state else None)
    # Shrink the chunk if the decays are strong enough for exp(g) to leave float range
    # (never for RWKV-7's |w| <= 0.61 at the default chunk size).
    max_w = float(w.detach().abs().max()) if w.numel() else 0.0
    while chunk_size > 1 and chunk_size / 2 * max_w > _MAX_HALF_CHUNK_DECAY:
        chunk_size //= 2
    L = max(1, min(chunk_size, T))
    N = (T + L - 1) // L
    pad = N * L - T

    def prep(x):  # [B, T, H, D] -> [B, H, N, L, D] in compute dtype, zero-padded at the end
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, L, H, -1).permute(0, 3, 1, 2, 4)

    # Padding with w = 0, k = v = a = b = 0 leaves the state untouched.
    r_, w_, k_, v_, a_, b_ = (prep(x) for x in (r, w, k, v, a, b))
    r_ = r_ * scale

    g = w_.cumsum(dim=3)                       # inclusive cumulative log decay   [B,H,N,L,K]
    g_prev = g - w_                            # exclusive
    ref = g[:, :, :, L // 2: L // 2 + 1]       # per-chunk reference point
    g_last = g[:, :, :, -1:]                   # [B,H,N,1,K]

    a_dec = a_ * (g_prev - ref).exp()          # a_t e^{g_{t-1}}   (relative to ref)
    r_dec = r_ * (g - ref).exp()               # r_t e^{g_t}
    inv = (ref - g).exp()
    b_inv, k_inv = b_ * inv, k_ * inv          # b_i e^{-g_i}, k_i e^{-g_i}

    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    strict = torch.tril(ones, diagonal=-1)
    incl = torch.tril(ones)
    zero = torch.zeros((), dtype=dt, device=r.device)
    A_ab = torch.where(strict, a_dec @ b_inv.transpose(-1, -2), zero)   # [B,H,N,L,L]
    A_ak = torch.where(strict, a_dec @ k_inv.transpose(-1, -2), zero)
    A_rb = torch.where(incl, r_dec @ b_inv.transpose(-1, -2), zero)
    A_rk = torch.where(incl, r_dec @ k_inv.transpose(-1, -2), zero)

    # U = W S0 + U_bar, with W, U_bar from one triangular solve.
    eye = torch.eye(L, dtype=dt, device=r.device)
    a_s0 = a_ * g_prev.exp()                   # absolute decay for the S0 term
    rhs = torch.cat([a_s0, A_ak @ v_], dim=-1)                            # [B,H,N,L,K+V]
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    W, U_bar = sol[..., :K], sol[..., K:]

    # Chunk-to-chunk map: S_L = M S0 + C.
    tail = (g_last - g).exp()                  # e^{g_L - g_i}
    b_tail, k_tail = b_ * tail, k_ * tail
    M = torch.diag_embed(g_last.squeeze(-2).exp()) + b_tail.transpose(-1, -2) @ W   # [B,H,N,K,K]
    C = b_tail.transpose(-1, -2) @ U_bar + k_tail.transpose(-1, -2) @ v_            # [B,H,N,K,V]

    S = (torch.zeros(B, H, K, V, dtype=dt, device=r.device) if initial_state is None
         else initial_state.to(dt))
    starts = []
    # unbind (not M[:, :, n]): its backward stacks the N gradients once instead of
    # materialising a full-size gradient per chunk, which would be quadratic in T.
    for M_n, C_n in zip(M.unbind(2), C.unbind(2)):
        starts.append(S)
        S = M_n @ S + C_n
    S0 = torch.stack(starts, dim=2)                                        # [B,H,N,K,V]

    r_s0 = r_ * g.exp()
    o = (r_s0 + A_rb @ W) @ S0 + A_rb @ U_bar + A_rk @ v_                 # [B,H,N,L,V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, V)[:, :T]
    return o.to(out_dtype), (S if output_final_state else None)


def wkv7_fla(r, w, k, v, a, b, scale: float = 1.0, initial_state=None,
             output_final_state: bool = False):
    """fla's Triton kernel (CUDA only)."""
    if not r.is_cuda:
        raise RuntimeError("wkv7 backend 'fla' needs CUDA tensors; use backend='torch' on CPU "
                           "(or 'auto', which picks it)")
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("wkv7 backend 'fla' needs flash-linear-attention and triton: "
                          "pip install flash-linear-attention triton") from e
    # The kernel reads every input in float32 internally; it is given one dtype throughout.
    w, k, v, a, b = (x.to(r.dtype) for x in (w, k, v, a, b))
    o, S = chunk_rwkv7(r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state)
    return o, S


def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
         initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
         backend: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """WKV-7 over a sequence. Returns ``(o [B,T,H,V], final_state [B,H,K,V] or None)``."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv7: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs(r, w, k, v, a, b, initial_state)
    if backend == "auto":
        backend = "fla" if r.is_cuda else "torch"
    if backend == "fla":
        return wkv7_fla(r, w, k, v, a, b, scale, initial_state, output_final_state)
    if backend == "torch":
        return wkv7_torch(r, w, k, v, a, b, scale, initial_state, output_final_state)
    return wkv7_recurrent(r, w, k, v, a, b, scale, initial_state, output_final_state)
